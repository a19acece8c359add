"""Per-layer quantization sensitivity: how much does 4-bit RTN on one layer alone hurt?

For each decoder layer, every Linear of that layer (and nothing else) is replaced by its
round-to-nearest fake-quantized weight (kompakt.ops.quant, symmetric, groups along the input
dimension), the model is scored against the unmodified one (KL, perplexity; reference.py),
and the original weights are put back. Layers with a large KL are the ones to keep at higher
precision in a mixed-precision recipe. A group size that does not divide a Linear's input
dimension falls back to one scale per output channel for that Linear (and is reported).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from kompakt.analyze.reference import Reference, Score, replay, score
from kompakt.model.arch import ArchSpec, linear_modules
from kompakt.ops.quant import fake_quantize


def group_for(in_features: int, group_size: int | None) -> int | None:
    """The group size to use for a Linear: `group_size` when it divides in_features, else None
    (per output channel)."""
    if group_size and in_features % group_size == 0:
        return group_size
    return None


@contextmanager
def quantized_layer(layer: nn.Module, spec: ArchSpec, bits: int, group_size: int | None) -> Iterator[dict]:
    """Fake-quantize every Linear of `layer` in place; restore the exact weights on exit.

    Yields {role: group size used (None = per channel)}.
    """
    saved: dict[str, torch.Tensor] = {}
    used: dict[str, int | None] = {}
    linears = linear_modules(layer, spec)
    try:
        for role, linear in linears.items():
            saved[role] = linear.weight.data.clone()
            used[role] = group_for(linear.in_features, group_size)
            linear.weight.data.copy_(fake_quantize(linear.weight.data, bits, used[role], symmetric=True))
        yield used
    finally:
        for role, weight in saved.items():
            linears[role].weight.data.copy_(weight)


def quant_sensitivity(
    model: nn.Module,
    layers: nn.ModuleList,
    spec: ArchSpec,
    reference: Reference,
    *,
    bits: int = 4,
    group_size: int | None = 64,
    advance: Callable[[], None] = lambda: None,
) -> tuple[list[Score], list[str]]:
    """Score the model with one layer at a time quantized; returns scores and fallback notes."""
    scores: list[Score] = []
    fallbacks: set[str] = set()
    for index, layer in enumerate(layers):
        with quantized_layer(layer, spec, bits, group_size) as used:
            # Layers before `index` see unchanged inputs: replay them from the reference run.
            with replay(layers, index, reference, index) as current:
                scores.append(score(model, reference, current))
        fallbacks.update(role for role, group in used.items() if group is None and group_size)
        advance()
    notes = []
    if fallbacks:
        notes.append(
            f"group size {group_size} does not divide the input dimension of {', '.join(sorted(fallbacks))}: "
            "those Linears were quantized with one scale per output channel"
        )
    return scores, notes
