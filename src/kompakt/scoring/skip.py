"""Skip cost: what the model loses when one decoder layer is replaced by the identity.

Measured, not estimated: layer i's output is replaced by its input (the residual stream passes
by), and the next-token distributions are compared with the reference's: KL(reference ||
skipped) averaged over the positions that predict a next token, with perplexity and top-1
agreement beside it. This is the "PPL" layer importance of Minitron (Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation": remove one layer, measure the
change) in the distribution-level form llama.cpp users compare models by (KL, top-1).

`skip_costs` scores every layer on a prepared `Reference` (the analysis: held-out windows, kept
for the quantization scores too); `skip_kl` streams calibration batches through the same code
(prune.depth). What skip_kl keeps at a time is one chunk's reference: every layer's input
[rows, seq, hidden] and the reference log-probabilities [rows, seq - 1, vocab] in fp32; a batch
is split into chunks of rows so that this stays under `max_bytes` (REFERENCE_BYTES, 1 GiB:
SmolLM2-135M in fp32 scores 9 rows of 256 tokens at once; a row longer than the budget alone,
e.g. 2048 tokens of an 8B model with a 128k vocabulary, is still scored, one row at a time).
Rows are independent, so chunking does not change the scores.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from kompakt.evaluate.topk import TOP_K
from kompakt.scoring.reference import Reference, Score, build_reference, score, skipped

REFERENCE_BYTES = 1 << 30  # what skip_kl holds for one chunk of rows (see the module docstring)


def skip_costs(
    model: nn.Module,
    layers: nn.ModuleList,
    reference: Reference,
    advance: Callable[[], None] = lambda: None,
) -> list[Score]:
    """Score the model with each decoder layer skipped in turn (one at a time)."""
    scores = []
    for index in range(len(layers)):
        with skipped(layers, index, reference) as current:
            scores.append(score(model, reference, current))
        advance()
    return scores


def rows_within(model: nn.Module, n_layers: int, seq: int, max_bytes: int) -> int:
    """How many rows of `seq` tokens one reference may hold within `max_bytes` (at least 1):
    per row, every layer's input (model dtype), the reference's top-k distributions (int32 id +
    fp32 log-prob per kept token, two fp32 per position) and the candidate's fp32 log-probs."""
    embeddings = model.get_input_embeddings().weight
    vocab, hidden = embeddings.shape
    topk = (seq - 1) * (min(TOP_K, vocab) * 8 + 8)
    per_row = seq * n_layers * hidden * embeddings.element_size() + topk + (seq - 1) * vocab * 4
    return max(1, max_bytes // per_row)


def skip_kl(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Iterable[torch.Tensor],
    teacher: nn.Module | None = None,
    *,
    max_bytes: int = REFERENCE_BYTES,
) -> list[float]:
    """Mean KL(reference || model with layer i skipped) per scored position, for every layer i.

    The reference is `teacher` when given (e.g. the unpruned model while prune.depth removes
    layers one at a time), else the model itself with no layer skipped. `batches` are consumed
    one at a time (a generator keeps only one on the device); memory: see the module docstring.
    """
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    for batch in batches:
        for chunk in batch.split(rows_within(model, len(layers), batch.shape[1], max_bytes)):
            reference = build_reference(model, layers, [chunk], teacher=teacher)
            tokens = reference.scored_tokens
            for index, cost in enumerate(skip_costs(model, layers, reference)):
                sums[index] += cost.kl_mean * tokens
            count += tokens
            del reference
    return (sums / max(1, count)).tolist()
