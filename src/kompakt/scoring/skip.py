"""Skip cost: what the model loses when one decoder layer is replaced by the identity.

Measured, not estimated: layer i's output is replaced by its input (the residual stream passes
by), and the next-token distributions are compared with the reference's: KL(reference ||
skipped) averaged over the positions that predict a next token, with perplexity and top-1
agreement beside it. This is the "PPL" layer importance of Minitron (Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation": remove one layer, measure the
change) in the distribution-level form llama.cpp users compare models by (KL, top-1).

`skip_costs` scores every layer on a prepared `Reference` (the analysis: held-out windows, kept
for the quantization scores too); `skip_kl` streams calibration batches through the same code
(prune.depth: only one batch's reference is held at a time).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from kompakt.scoring.reference import Reference, Score, build_reference, score, skipped


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


def skip_kl(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Iterable[torch.Tensor],
    teacher: nn.Module | None = None,
) -> list[float]:
    """Mean KL(reference || model with layer i skipped) per scored position, for every layer i.

    The reference is `teacher` when given (e.g. the unpruned model while prune.depth removes
    layers one at a time), else the model itself with no layer skipped.
    """
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    for batch in batches:
        reference = build_reference(model, layers, [batch], teacher=teacher)
        tokens = reference.scored_tokens
        for index, cost in enumerate(skip_costs(model, layers, reference)):
            sums[index] += cost.kl_mean * tokens
        count += tokens
        del reference
    return (sums / max(1, count)).tolist()
