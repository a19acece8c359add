"""One shared weight for a group of layers, plus each layer's low-rank delta, fitted on their inputs.

share.layers' `init: regmean`. A group of depths d shares one weight W; depth d computes
(W + B_d A_d) x where its original computed W_d x. What matters is the output on the inputs the
depth really sees (X_d, calibration activations), so both parts minimise

    Σ_d ‖(W_d − W − B_d A_d) X_d‖²_F

instead of the weight-space distance the paper's Average init and plain-SVD deltas minimise. With
the damped Gram H_d = X_d X_dᵀ + λ_d I (λ_d = `damp` × its mean diagonal, as GPTQ damps):

- the shared weight, deltas fixed: W = (Σ_d (W_d − B_d A_d) H_d)(Σ_d H_d)⁻¹ — with zero deltas
  this is RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
  Models"), the least-squares merge of Linears;
- each delta, W fixed: with H_d = S Sᵀ (Cholesky), B_d A_d = trunc_r((W_d − W) S) S⁻¹ — SVD-LLM's
  truncation-aware whitening (Wang et al. 2024), the best rank-r delta in that norm;
- `rounds` alternations of the two. Each step solves its part exactly in the same metric, so the
  objective never rises (block coordinate descent).

On SmolLM2-135M, 30 → 15 blocks in pairs, rank 16, KL to the original on held-out wiki.valid
before any training: Average + SVD deltas 10.8, RegMean + SVD 6.2, RegMean + whitened 4.6,
after 2 rounds 4.2, after 5 rounds 4.0 (removing 14 layers by block influence instead: 3.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kompakt.ops.residual_svd import randomized_factors, residual_factors, takes_randomized


@dataclass
class GroupFit:
    """The fit of one group: the shared weight, each depth's (B [out, r], A [r, in]) and the
    remaining output error of each depth relative to its own output energy."""

    shared: torch.Tensor
    deltas: list[tuple[torch.Tensor, torch.Tensor]]
    relative_error: list[float]


def merge_group(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], rank: int, *, rounds: int = 5,
                damp: float = 0.01) -> GroupFit:  # fmt: skip
    """Fit the shared weight and rank-`rank` deltas of one group (weights [out, in], grams [in, in]).

    rank 0: RegMean alone (plain sharing). Computed in float32 (float64 for float64 weights) on
    the weights' device — the damping keeps the systems well conditioned, and float64 doubles the
    time of the pass; returned in the first weight's dtype.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"{len(weights)} weights and {len(grams)} Gram matrices: one of each per depth expected")
    shape = tuple(weights[0].shape)
    if any(tuple(w.shape) != shape for w in weights) or any(tuple(g.shape) != (shape[1],) * 2 for g in grams):
        raise ValueError(f"weights of shape {shape} need equal shapes and Gram matrices of {shape[1]}x{shape[1]}")
    if not 0 <= rank <= min(shape):
        raise ValueError(f"rank {rank} outside 0..{min(shape)} for a {shape} weight")
    precision = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    work = [w.detach().to(precision) for w in weights]
    damped = [_damped(g.to(device=work[0].device, dtype=precision), damp) for g in grams]
    factors = [torch.linalg.cholesky(h) for h in damped]
    total = torch.linalg.cholesky(sum(damped))  # Σ H_d, factored once for every refit
    regmean = torch.cholesky_solve(sum(w @ h for w, h in zip(work, damped)).T, total).T
    zero = work[0].new_zeros(shape[0], 0), work[0].new_zeros(0, shape[1])
    deltas, shared = [zero] * len(work), regmean
    for step in range(rounds + 1 if rank else 0):
        deltas = [_whitened_delta(w - shared, s, rank) for w, s in zip(work, factors)]
        if step < rounds:
            shared = _refit(regmean, damped, deltas, total)
    errors = [_relative_error(w, shared, delta, h) for w, delta, h in zip(work, deltas, damped)]
    dtype = weights[0].dtype
    return GroupFit(shared=shared.to(dtype), deltas=[(b.to(dtype).contiguous(), a.to(dtype).contiguous())
                                                     for b, a in deltas], relative_error=errors)  # fmt: skip


def _damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    h = gram.detach()
    scale = float(h.diagonal().mean()) or 1.0  # an all-zero Gram (a depth never reached): the identity metric
    return h + damp * scale * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _refit(regmean: torch.Tensor, damped: list[torch.Tensor], deltas: list[tuple[torch.Tensor, torch.Tensor]],
          total: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """argmin_W Σ_d ‖(W_d − B_d A_d − W) S_d‖²: W = (Σ W_d H_d − Σ B_d A_d H_d)(Σ H_d)⁻¹, which is
    RegMean's W₀ = (Σ W_d H_d)(Σ H_d)⁻¹ minus Σ B_d (A_d H_d (Σ H_d)⁻¹) (`total`: the Cholesky
    factor of Σ H_d): solves of r rows instead of a full [out, in] one every round."""
    # H symmetric: X = Y H⁻¹ ⇔ H Xᵀ = Yᵀ
    return regmean - sum(b @ torch.cholesky_solve((a @ h).T, total).T for (b, a), h in zip(deltas, damped))


def _whitened_delta(residual: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-r approximation of `residual` in the norm ‖· S‖ (H = S Sᵀ).
    Wide matrices multiply by R·S as its two factors instead of forming it: forming costs out·in²
    every round, the randomized iteration (out + in)·in per column of its thin basis."""
    if takes_randomized(residual.shape, rank):
        b, v_t = randomized_factors(lambda x: residual @ (factor @ x), lambda y: factor.T @ (residual.T @ y),
                                    residual, rank)  # fmt: skip
    else:
        whitened = residual @ factor
        b, v_t = residual_factors(whitened, torch.zeros_like(whitened), rank)  # U_r Σ_r, V_rᵀ of R S
    # A = V_rᵀ S⁻¹, solved as Sᵀ Aᵀ = V_r (S lower triangular) instead of inverting S
    return b, torch.linalg.solve_triangular(factor.T, v_t.T, upper=True).T


def _relative_error(weight: torch.Tensor, shared: torch.Tensor, delta: tuple[torch.Tensor, torch.Tensor],
                    damped: torch.Tensor) -> float:  # fmt: skip
    """‖(W_d − W − B A) S‖² / ‖W_d S‖²: the share of the depth's output energy the fit misses."""
    error = weight - shared - delta[0] @ delta[1]
    total = float(((weight @ damped) * weight).sum())
    return float(((error @ damped) * error).sum()) / total if total > 0 else 0.0
