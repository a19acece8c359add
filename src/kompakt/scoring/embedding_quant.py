"""Per-layer quantization sensitivity of an encoder: sentence-embedding cosine with one layer RTN'd.

The encoder form of quant_sensitivity.py: every Linear of one layer (and nothing else) is
replaced by its round-to-nearest weight on quant.rtn's grid (the same `quantized_layer`), the
calibration sentences are embedded, and the embeddings are compared with the unedited model's
(mean and worst cosine, embedding_edits.compare). Layers with the lowest cosine are the ones to keep
at higher precision; the per-Linear costs say which of their Linears (BERT's FFN output is
usually the one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kompakt.model.arch import ArchSpec, linear_modules
from kompakt.model.inputs import SentenceBatch
from kompakt.scoring.embedding_edits import EmbeddingScore, compare, pooled_embeddings
from kompakt.scoring.quant_sensitivity import fallback_note, quantized_layer


def embedding_quant_scores(
    model: nn.Module,
    layers: nn.ModuleList,
    spec: ArchSpec,
    batches: Sequence[SentenceBatch],
    pooling,
    reference: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 64,
    per_linear: bool = False,
    advance: Callable[[], None] = lambda: None,
) -> tuple[list[EmbeddingScore], list[str]]:
    """Score the model with one layer at a time quantized; returns scores and fallback notes.

    With `per_linear`, each Linear of the layer is also quantized alone (one more embedding pass
    per Linear): score.per_linear[role] is its 1 - cosine, what a mixed-precision choice needs.
    """
    scores: list[EmbeddingScore] = []
    changed: dict[str, int | None] = {}
    for layer in layers:
        with quantized_layer(layer, spec, bits, group_size) as used:
            scores.append(compare(reference, pooled_embeddings(model, batches, pooling)))
        linears = linear_modules(layer, spec)
        if per_linear:
            for role in linears:
                with quantized_layer(layer, spec, bits, group_size, roles=(role,)):
                    scores[-1].per_linear[role] = compare(reference, pooled_embeddings(model, batches, pooling)).loss
        for role, group in used.items():
            if group_size and group != group_size and group_size < linears[role].in_features:
                changed[role] = group
        advance()
    return scores, [fallback_note(group_size, changed)] if changed else []
