"""The best rank-r correction of a shared weight towards a layer's own: truncated SVD of the residual.

Relaxed Recursive Transformers (Bae et al. 2024, "Relaxed Recursive Transformers: Effective
Parameter Sharing with Layer-wise LoRA", Sec. 3) give every depth that reuses a shared weight Φ'
its own low-rank delta B·A, initialised from the residual R = W_depth − Φ':
U_r Σ_r V_rᵀ = TruncatedSVD(R, r), B = U_r Σ_r, A = V_rᵀ (as the paper). By Eckart–Young this is
the rank-r matrix closest to R in Frobenius norm, so at r = min(out, in) the layer's own weight
is recovered exactly (up to float rounding) and r = 0 is plain sharing.

The top singular pairs come from the eigendecomposition of the smaller Gram matrix (RᵀR or RRᵀ),
the other side by one product with R: the same factors as a full SVD (eigh returns orthonormal
vectors, so full rank still recovers R), about 3x faster on CPU (measured on SmolLM2's 1536x576
matrices; a model has 7 per depth). Above `RANDOMIZED_ABOVE` rows and columns that O(n³)
eigendecomposition (3.7 s for 4096 x 4096 on 2 cores, most of share.layers' regmean fit on a
7B-shaped model) gives way to randomized subspace iteration (Halko, Martinsson and Tropp 2011,
Alg. 4.4, as torch.svd_lowrank; written here because torch's needs the matrix itself, and
share.layers' whitened residual R·S is cheaper to multiply by as two factors than to form) with
`rank` extra columns (at least 16) and 8 power iterations: on SmolLM2's residuals of adjacent
layers, whose spectra are flat (the hard case for it), that keeps 99.5-99.98 % of the optimal
rank-16 energy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RANDOMIZED_ABOVE = 2048  # rows and columns; below, the exact eigendecomposition takes under a second
POWER_ITERATIONS = 8


def residual_factors(original: torch.Tensor, shared: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, rank], A [rank, in]) with B·A the best rank-`rank` approximation of original − shared.

    B = U_r Σ_r, A = V_rᵀ (A has orthonormal rows); computed in fp32 (fp64 for fp64 inputs) on the
    inputs' device and returned in original's dtype.
    """
    if original.shape != shared.shape or original.dim() != 2:
        raise ValueError(f"residual of {tuple(original.shape)} and {tuple(shared.shape)}: two equal 2-D shapes expected")
    if not 0 < rank <= min(original.shape):
        raise ValueError(f"rank {rank} outside 1..{min(original.shape)} for a {tuple(original.shape)} matrix")
    work = torch.float64 if original.dtype == torch.float64 else torch.float32
    residual = original.to(work) - shared.to(work)  # [out, in]
    out_features, in_features = residual.shape
    if takes_randomized(residual.shape, rank):
        b, a = randomized_factors(lambda x: residual @ x, lambda y: residual.T @ y, residual, rank)
    elif in_features <= out_features:
        _, vecs = torch.linalg.eigh(residual.T @ residual)  # ascending eigenvalues σ²; V [in, in]
        v = vecs[:, -rank:].flip(1)  # the top-r right singular vectors [in, r]
        b, a = residual @ v, v.T  # B = R V_r = U_r Σ_r
    else:
        _, vecs = torch.linalg.eigh(residual @ residual.T)  # U [out, out]
        u = vecs[:, -rank:].flip(1)  # [out, r]
        scaled = u.T @ residual  # Σ_r V_rᵀ [r, in]
        sigma = scaled.norm(dim=1)
        a = scaled / torch.where(sigma > 0, sigma, 1.0)[:, None]  # V_rᵀ (a zero row where σ = 0)
        b = u * sigma
    return b.to(original.dtype).contiguous(), a.to(original.dtype).contiguous()


def takes_randomized(shape: tuple[int, ...], rank: int) -> bool:
    """Whether the top `rank` singular pairs of a matrix of this shape come from randomized
    subspace iteration (wide matrices, a rank small enough that its oversampled basis stays thin)."""
    smaller = min(shape)
    return smaller > RANDOMIZED_ABOVE and 2 * _columns(rank) <= smaller


def randomized_factors(multiply: Callable[[torch.Tensor], torch.Tensor], multiply_t: Callable[[torch.Tensor], torch.Tensor],
                       like: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B = U_r Σ_r, A = V_rᵀ) of a matrix M of `like`'s shape, dtype and device that is known only
    through M·X (`multiply`) and Mᵀ·Y (`multiply_t`). The random start is seeded, so a pass gives
    the same factors every run, and drawn from its own generator (the caller's stream is left as
    it was)."""
    in_features = like.shape[1]
    generator = torch.Generator(device=like.device).manual_seed(0)
    start = torch.randn(in_features, _columns(rank), generator=generator, dtype=like.dtype, device=like.device)
    basis = torch.linalg.qr(multiply(start)).Q  # [out, columns], orthonormal
    for _ in range(POWER_ITERATIONS):  # each round sharpens the basis towards the top singular vectors
        basis = torch.linalg.qr(multiply(torch.linalg.qr(multiply_t(basis)).Q)).Q
    u, sigma, v_t = torch.linalg.svd(multiply_t(basis).T, full_matrices=False)  # of Qᵀ M [columns, in]
    return (basis @ u[:, :rank]) * sigma[:rank], v_t[:rank]


def _columns(rank: int) -> int:
    """The randomized basis' width: the rank and as many extra columns, at least 16."""
    return rank + max(rank, 16)
