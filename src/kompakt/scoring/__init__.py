"""Importance, written once: what the analysis reports and what the passes cut by.

- layers.py: block influence (ShortGPT), angular distance (Gromov et al.), the layer ranking;
- skip.py: skip cost (KL / perplexity / top-1 with one layer replaced by the identity);
- channels.py: MLP-channel, head, KV-group and hidden-channel importance (Minitron);
- quant_sensitivity.py: per-layer RTN sensitivity on quant.rtn's grid;
- reference.py: the reference outputs and prefix replay that make one-layer edits cheap;
- embedding_edits.py, embedding_quant.py: sentence encoders' one-layer edits (a layer skipped,
  a layer or one Linear RTN'd) scored by the cosine of the sentence embeddings.

`kompakt.analyze` presents these numbers (tables, plots, "where to cut"); prune.depth and
prune.width rank by the same functions, so the layers the analysis names are the layers the
pass removes. This package sits below analyze/ and passes/ and imports neither.
"""

from __future__ import annotations
