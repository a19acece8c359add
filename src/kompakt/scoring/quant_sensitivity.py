"""Per-layer quantization sensitivity: how much does RTN on one layer alone hurt?

For each decoder layer, every Linear of that layer (and nothing else) is replaced by its
round-to-nearest weight on the grid `quant.rtn {bits, group_size, symmetric: true}` stores
(kompakt.ops.quant.QuantGrid, symmetric, groups along the input dimension, fp16 scales), the
model is scored against the unmodified one (KL, perplexity, top-1; reference.py), and the
original weights are put back. Layers with a large KL are the ones to keep at higher precision
in a mixed-precision recipe. RTN is the measuring stick because it is the baseline every
post-training method improves on (GPTQ, AWQ): a layer fragile under RTN is where they matter.

The grid of each Linear is the passes' own (`kompakt.model.quantized.storage_grid`): a group
size that does not divide a Linear's input width falls back exactly as quant.rtn does (the
largest power-of-two divisor below it, 576 with 128 -> 64, else one scale per output channel),
and the notes name those Linears.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from kompakt.model.arch import ArchSpec, linear_modules
from kompakt.model.quantized import storage_grid
from kompakt.scoring.reference import Reference, Score, replay, score


@contextmanager
def quantized_layer(layer: nn.Module, spec: ArchSpec, bits: int, group_size: int | None,
                    roles: tuple[str, ...] | None = None) -> Iterator[dict]:  # fmt: skip
    """Quantize every Linear of `layer` (or only those of `roles`) in place; restore the exact
    weights on exit.

    Yields {role: group size used (None = per channel)}.
    """
    saved: dict[str, torch.Tensor] = {}
    used: dict[str, int | None] = {}
    linears = {role: linear for role, linear in linear_modules(layer, spec).items() if roles is None or role in roles}
    try:
        for role, linear in linears.items():
            saved[role] = linear.weight.data.clone()
            grid = storage_grid(linear.in_features, bits, group_size)
            used[role] = grid.group_size
            linear.weight.data.copy_(grid.fake_quantize(linear.weight.data.float()).to(linear.weight.dtype))
        yield used
    finally:
        for role, weight in saved.items():
            linears[role].weight.data.copy_(weight)


def fallback_note(group_size: int, changed: dict[str, int | None]) -> str:
    by_group: dict[str, list[str]] = {}
    for role, group in sorted(changed.items()):
        by_group.setdefault(str(group) if group else "one scale per output channel", []).append(role)
    used = "; ".join(f"{', '.join(roles)}: {group}" for group, roles in by_group.items())
    return f"group size {group_size} does not divide the input width of every Linear; used instead, as quant.rtn does: {used}"


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
    changed: dict[str, int | None] = {}
    for index, layer in enumerate(layers):
        with quantized_layer(layer, spec, bits, group_size) as used:
            # Layers before `index` see unchanged inputs: replay them from the reference run.
            with replay(layers, index, reference, index) as current:
                scores.append(score(model, reference, current))
        linears = linear_modules(layer, spec)
        for role, group in used.items():
            if group_size and group != group_size and group_size < linears[role].in_features:
                changed[role] = group
        advance()
    return scores, [fallback_note(group_size, changed)] if changed else []
