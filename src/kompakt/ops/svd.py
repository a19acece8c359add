"""Truncated SVD of a weight W [out, in] into B [out, r] · A [r, in], plain or input-aware.

Every method here decomposes W·T for an invertible column transform T chosen from the inputs
the layer sees, keeps the r largest singular values, and undoes T on the right factor:

    W·T = U Σ Vᵀ      B = U_r √Σ_r      A = √Σ_r V_rᵀ T⁻¹      (so B·A ≈ W)

- plain (T = I): the best rank-r W in Frobenius norm; blind to which inputs matter.
- ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
  Large Language Models", arXiv:2312.05821): T = diag(mean|x_j|^α), α = 0.5 as the paper. Input
  channels that carry large activations weigh more in the truncation.
- SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
  Language Model Compression", arXiv:2403.07378): T = L, the Cholesky factor of the calibration
  Gram matrix XᵀX = L Lᵀ (X [tokens, in]). Then ‖(W − BA) Xᵀ‖²_F = ‖(W − BA) L‖²_F = Σ of the
  discarded σ², so truncating the smallest singular values is the optimal rank-r choice for the
  layer's output on the calibration data (the "truncation-aware data whitening"). A Gram that
  is not positive definite (dead channels, fewer tokens than inputs) gets λ·I added first, as
  the reference code does; `Transform.regularised` says by how much.

The matching reference implementations are AIoT-MLSys-Lab/SVD-LLM (`whitening`, `local_update`)
and hahnyuan/ASVD4LLM (`modules/svd_linear.py`): both split √Σ between the two factors, as here.
Everything is computed in float64 (Cholesky and SVD of ill-conditioned Grams); the factors are
returned in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ASVD_ALPHA = 0.5  # the ASVD paper's exponent on the activation magnitude
_SCALE_EPS = 1e-6  # ASVD4LLM adds it to the scaling so no column is divided by zero
_REGULARISE = 1e-6  # relative to the mean diagonal: what is added beyond -λ_min to a singular Gram


@dataclass(frozen=True)
class Factors:
    """W ≈ up · down: `down` A [rank, in] runs first, `up` B [out, rank] second.

    loss: the discarded share of the energy of W·T, Σ_{j≥r} σ_j² / Σ σ_j² (for SVD-LLM the
    relative output error on the calibration data).
    """

    up: torch.Tensor
    down: torch.Tensor
    loss: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def product(self) -> torch.Tensor:
        """The dense equivalent B·A [out, in]."""
        return self.up @ self.down


@dataclass(frozen=True)
class Transform:
    """The column transform T of one weight (module docstring).

    kind: "identity", "diagonal" (`matrix` is the diagonal [in]) or "cholesky" (`matrix` is the
    lower-triangular L [in, in]). regularised: what was added to the Gram's diagonal before its
    Cholesky factorization succeeded (0.0 when it was positive definite).
    """

    kind: str
    matrix: torch.Tensor | None = None
    regularised: float = 0.0

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W·T (float64)."""
        w = weight.detach().double()
        if self.kind == "identity":
            return w
        m = self.matrix.to(w.device)  # type: ignore[union-attr]
        return w * m if self.kind == "diagonal" else w @ m

    def undo(self, rows: torch.Tensor) -> torch.Tensor:
        """M·T⁻¹ for M [r, in] (a triangular solve for the Cholesky factor, never an inverse)."""
        if self.kind == "identity":
            return rows
        m = self.matrix.to(rows.device)  # type: ignore[union-attr]
        if self.kind == "diagonal":
            return rows / m
        return torch.linalg.solve_triangular(m, rows, upper=False, left=False)


def identity() -> Transform:
    return Transform("identity")


def activation_scaling(mean_abs: torch.Tensor, alpha: float = ASVD_ALPHA) -> Transform:
    """ASVD's T = diag(mean|x|^α + ε) from the mean absolute input per channel [in]."""
    scale = mean_abs.detach().double().clamp(min=0) ** alpha + _SCALE_EPS
    return Transform("diagonal", scale)


def whitening(gram: torch.Tensor) -> Transform:
    """SVD-LLM's T = L with XᵀX = L Lᵀ, from the Gram matrix [in, in] (any positive multiple of
    XᵀX: a common factor scales every singular value alike). Not positive definite: add
    (−λ_min + 1e-6 · mean diagonal)·I, as the reference code adds (−λ_min + 1e-6)·I."""
    g = gram.detach().double()
    g = (g + g.T) / 2
    lower, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return Transform("cholesky", lower)
    smallest = float(torch.linalg.eigvalsh(g)[0])
    shift = max(-smallest, 0.0) + _REGULARISE * max(float(g.diagonal().mean()), 1e-12)
    lower = torch.linalg.cholesky(g + shift * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    return Transform("cholesky", lower, regularised=shift)


def singular_values(weight: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Singular values of W·T, largest first (float64): their squares past rank r are the
    truncation loss (exactly the output error on the calibration data for SVD-LLM)."""
    return torch.linalg.svdvals(transform.apply(weight))


def factorize(weight: torch.Tensor, rank: int, transform: Transform | None = None) -> Factors:
    """The rank-`rank` factors of W [out, in] (module docstring). ValueError when `rank` is not
    below the break-even rank out·in/(out+in), where the factors would hold more than W."""
    out_features, in_features = weight.shape
    if not 0 < rank < break_even_rank(out_features, in_features):
        raise ValueError(
            f"rank {rank} of a {out_features}x{in_features} weight must be in 1..{max_rank(out_features, in_features, 1)}"
            f" (below its break-even rank {break_even_rank(out_features, in_features):.1f})"
        )
    transform = transform or identity()
    u, s, vh = torch.linalg.svd(transform.apply(weight), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # [out, r]
    down = transform.undo(root[:, None] * vh[:rank])  # [r, in]
    energy = s.square()
    loss = float(energy[rank:].sum() / energy.sum()) if float(energy.sum()) > 0 else 0.0
    return Factors(up=up.float(), down=down.float(), loss=loss)


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank at which r·(out + in) factor weights equal the out·in dense ones."""
    return out_features * in_features / (out_features + in_features)


def max_rank(out_features: int, in_features: int, multiple: int = 8) -> int:
    """The largest multiple of `multiple` strictly below the break-even rank (0: none)."""
    limit = break_even_rank(out_features, in_features)
    rank = int(limit) // multiple * multiple
    return rank - multiple if rank >= limit else rank
