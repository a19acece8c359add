"""Global rank allocation: spend a parameter budget where truncation loses least.

Each matrix i (out × in) comes with the singular values σ of its transformed weight W·T
(kompakt.ops.svd: plain, ASVD-scaled or SVD-LLM-whitened). Its loss at rank r is the share of
its energy the truncation discards, Σ_{j≥r} σ_j² / Σ_j σ_j² — for SVD-LLM exactly the relative
output error ‖(W − BA)Xᵀ‖² / ‖WXᵀ‖² on the calibration data. Sharing it out to comparable
units lets one budget cover matrices of very different output scales.

The rule (a greedy knapsack): every matrix starts at the smallest rank (`multiple`, 8); then,
repeatedly, the step with the largest loss reduction per parameter is taken, among
- "add `multiple` more ranks" (costs multiple·(out+in) parameters), while that stays strictly
  below the break-even rank out·in/(out+in), and
- "keep the matrix dense" once no further step fits below break-even (costs out·in − r·(out+in)
  and recovers all the loss left),
until the next best step no longer fits in the budget (that matrix then stops; the others go
on). A matrix whose break-even rank is below `multiple` stays dense from the start. The total
never exceeds the budget, so at least the requested fraction is removed.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kompakt.ops.svd import max_rank


@dataclass(frozen=True)
class Spectrum:
    """One matrix for the allocation: its shape and the singular values of W·T (largest first)."""

    out_features: int
    in_features: int
    singular_values: torch.Tensor

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features

    def energy(self) -> torch.Tensor:
        """σ_j² / Σσ² (float64; all zeros for a zero matrix)."""
        sq = self.singular_values.double().square()
        total = float(sq.sum())
        return sq / total if total > 0 else sq


def _next_step(spec: Spectrum, energy: torch.Tensor, rank: int, multiple: int) -> tuple[float, int] | None:
    """(loss reduction, parameter cost) of the matrix's next step from `rank`, None if dense."""
    width = spec.out_features + spec.in_features
    if rank + multiple <= max_rank(spec.out_features, spec.in_features, multiple):
        return float(energy[rank : rank + multiple].sum()), multiple * width
    return float(energy[rank:].sum()), spec.dense - rank * width


def allocate_ranks(spectra: Sequence[Spectrum], budget: int, multiple: int = 8) -> list[int | None]:
    """Ranks (None = stays dense) whose parameters total at most `budget` (module docstring).

    Raises:
        ValueError: even the smallest ranks exceed the budget (names what they need).
    """
    ranks: list[int | None] = []
    energies = [spec.energy() for spec in spectra]
    for spec in spectra:
        ranks.append(multiple if max_rank(spec.out_features, spec.in_features, multiple) >= multiple else None)
    used = parameters(spectra, ranks)
    if used > budget:
        raise ValueError(f"the smallest ranks need {used:,} parameters, more than the budget of {budget:,}")
    heap: list[tuple[float, int, int, int]] = []  # (-gain per parameter, index, rank, cost)

    def push(index: int) -> None:
        rank = ranks[index]
        if rank is None:
            return
        gain, cost = _next_step(spectra[index], energies[index], rank, multiple)
        heapq.heappush(heap, (-gain / max(cost, 1), index, rank, cost))

    for index in range(len(spectra)):
        push(index)
    while heap:
        _, index, rank, cost = heapq.heappop(heap)
        if used + cost > budget:
            continue  # this matrix stops here; cheaper steps of others may still fit
        used += cost
        step_to = rank + multiple
        spec = spectra[index]
        ranks[index] = step_to if step_to <= max_rank(spec.out_features, spec.in_features, multiple) else None
        push(index)
    return ranks


def parameters(spectra: Sequence[Spectrum], ranks: Sequence[int | None]) -> int:
    """Parameters the matrices hold at `ranks` (None = dense)."""
    return sum(s.dense if r is None else r * (s.out_features + s.in_features) for s, r in zip(spectra, ranks))
