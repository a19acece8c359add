"""Basis Sharing math: one whitened SVD basis for the same-type weights of a group of layers.

Basis Sharing (Wang et al. 2024, "Basis Sharing: Cross-Layer Parameter Sharing for Large
Language Model Compression", arXiv:2410.03765): the weights W_1..W_n [out, in] of one matrix
type in n adjacent layers are written W_i ≈ B_i·A_i where one of the two factors is the same
tensor in every layer of the group. Which side is shared matters, and both are here:

- side "in" (the paper's: its `Basis` is a Linear in -> k shared by the group, each layer's
  `Coefficient` k -> out its own): A [k, in] shared, B_i [out, k] per layer. Meaningful where
  the input is the residual stream (q, k, v, gate, up), whose coordinates every layer shares.
  The rows [W_1; …; W_n] are stacked vertically and whitened on the right by one Cholesky
  factor L of the group's pooled Gram Ĝ = Σ G_i / tr(G_i) (each layer's Gram normalised, so
  deep layers' larger activations do not drown the shallow ones; the paper pools the raw
  inputs). A = the top-k right singular vectors of the stack, unwhitened (V_kᵀ L⁻¹). Then each
  B_i is refit on its own layer's Gram G_i in closed form, B_i = W_i G_i Aᵀ (A G_i Aᵀ)⁻¹, the
  least-squares optimum of ‖(W_i − B_i A) X_iᵀ‖² for that A, so the pooled whitening costs the
  layer nothing it could get back with its own coefficients.
- side "out": B [out, k] shared, A_i [k, in] per layer. Meaningful where the output is the
  residual stream (o, down). The whitened W_i L_i (each layer with its own Cholesky factor,
  exactly SVD-LLM's whitening) are stacked horizontally [W_1 L_1 | … | W_n L_n] (out × n·in);
  with U_k its top-k left singular vectors, B = U_k and A_i = U_kᵀ W_i (the projection of W_i
  on the shared column space), and Σ_i ‖(W_i − B A_i) X_iᵀ‖² is exactly the discarded energy
  of the stack: the stacked truncation is optimal for the group.

Each layer's block is divided by its whitened norm ‖W_i L_i‖ before stacking, so the stack's
discarded energy is the sum of the layers' *relative* output errors — the loss per-layer
SVD-LLM (kompakt.ops.svd, kompakt.ops.rank_alloc) allocates ranks on, so both compare on one
scale. A group's spectrum (`GroupSpectrum`) plugs into the same global rank allocation: a
rank-k group costs k·(out + n·in) ("out") or k·(n·out + in) ("in") parameters, its break-even
rank is where that reaches n·out·in, and its loss counts n matrices.

Spectra come from Gram matrices (the stack's MMᵀ or MᵀM, summed over the group's blocks, never
the stack itself) and are computed in float32 for the choice of side and group size, float64
for the factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kompakt.ops import svd
from kompakt.ops.rank_alloc import Spectrum

SIDES = ("in", "out")
_RIDGE = 1e-8  # relative to the mean diagonal of A G Aᵀ in the refit (a rank-deficient input)


@dataclass(frozen=True)
class GroupSpectrum(Spectrum):
    """A group of `members` same-shape matrices seen as one (out, in) for the rank allocation:
    out × n·in for side "out", n·out × in for side "in". Its energy counts `members` matrices,
    so a group competes with single matrices on the sum of relative losses."""

    members: int = 1

    def energy(self) -> torch.Tensor:
        return super().energy() * self.members


@dataclass(frozen=True)
class SharedFactors:
    """W_i ≈ ups[i] · downs[i]; the shared factor is the very same tensor in every entry.

    side "in": `downs` hold one A [k, in] n times; side "out": `ups` hold one B [out, k].
    losses: each layer's relative output error ‖(W_i − B_i A_i) X_iᵀ‖² / ‖W_i X_iᵀ‖² on the
    calibration Grams.
    """

    side: str
    ups: list[torch.Tensor]
    downs: list[torch.Tensor]
    losses: list[float]

    @property
    def rank(self) -> int:
        return int(self.downs[0].shape[0])


def layer_block(weight: torch.Tensor, gram: torch.Tensor, side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What one layer adds to its group's stack Gram, independent of the grouping (so a caller
    trying several group sizes computes it once per layer): "out": W G Wᵀ / tr(W G Wᵀ) [out, out]
    (its own whitening, normalised); "in": Wᵀ W [in, in] (whitened and normalised per group)."""
    w = weight.detach().to(dtype)
    if side == "in":
        return w.T @ w
    p = w @ gram.to(device=w.device, dtype=dtype) @ w.T
    return p / p.trace().clamp(min=torch.finfo(dtype).tiny)


def group_spectrum(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], side: str,
                   dtype: torch.dtype = torch.float32,
                   blocks: Sequence[torch.Tensor] | None = None) -> GroupSpectrum:  # fmt: skip
    """The singular values of the group's normalised whitened stack (module docstring);
    `blocks`: the layers' `layer_block`s when the caller has them already."""
    gram = _stack_gram(weights, grams, side, dtype, blocks)
    values = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
    out_features, in_features = weights[0].shape
    n = len(weights)
    shape = (out_features, n * in_features) if side == "out" else (n * out_features, in_features)
    return GroupSpectrum(*shape, values.double().cpu(), members=n)


def _stack_gram(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], side: str,
                dtype: torch.dtype, blocks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """"out": Σ_i W_i G_i W_iᵀ / n_i² [out, out] (= M Mᵀ of the horizontal stack);
    "in": Lᵀ (Σ_i W_iᵀ W_i / n_i²) L [in, in] (= MᵀM of the vertical stack, L from the pooled
    Gram, n_i² = ‖W_i L‖² = ⟨W_iᵀW_i, L Lᵀ⟩)."""
    if blocks is None:
        blocks = [layer_block(w, g, side, dtype) for w, g in zip(weights, grams, strict=True)]
    blocks = [b.to(dtype) for b in blocks]
    if side == "out":
        total = torch.stack(list(blocks)).sum(0)
        return (total + total.T) / 2
    lower = pooled_whitening(grams).matrix.to(device=blocks[0].device, dtype=dtype)  # type: ignore[union-attr]
    pooled = lower @ lower.T
    total = sum(b / (b * pooled).sum().clamp(min=torch.finfo(dtype).tiny) for b in blocks)
    total = lower.T @ total @ lower  # type: ignore[operator]
    return (total + total.T) / 2


def pooled_gram(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ G_i / tr(G_i) (float64): every layer's inputs weigh alike in the shared whitening."""
    total = None
    for g in grams:
        g = g.detach().double()
        g = g / g.trace().clamp(min=1e-300)
        total = g if total is None else total + g
    return total  # type: ignore[return-value]


def pooled_whitening(grams: Sequence[torch.Tensor]) -> svd.Transform:
    """The Cholesky transform of the pooled Gram (regularised as SVD-LLM's when singular)."""
    return svd.whitening(pooled_gram(grams))


def shared_factors(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], side: str,
                   rank: int) -> SharedFactors:  # fmt: skip
    """The rank-`rank` shared basis and per-layer coefficients of one group (float32 results)."""
    if side not in SIDES:
        raise ValueError(f"side {side!r} is not one of {SIDES}")
    gram = _stack_gram(weights, grams, side, torch.float64)
    _, vectors = torch.linalg.eigh(gram)
    top = vectors.flip(1)[:, :rank]  # eigenvectors of the largest eigenvalues, [dim, k]
    if side == "out":
        ups = [top.float()] * len(weights)
        downs = [(top.T @ w.detach().double().to(top.device)).float() for w in weights]
    else:
        lower = pooled_whitening(grams).matrix.to(top.device)  # type: ignore[union-attr]
        basis = torch.linalg.solve_triangular(lower, top.T, upper=False, left=False)  # V_kᵀ L⁻¹ [k, in]
        basis = basis / basis.norm(dim=1, keepdim=True).clamp(min=1e-300)  # unit rows: a tidy factor to quantize
        ups = [_refit(w, g, basis).float() for w, g in zip(weights, grams, strict=True)]
        downs = [basis.float()] * len(weights)
    losses = [relative_loss(w, u, d, g) for w, u, d, g in zip(weights, ups, downs, grams, strict=True)]
    return SharedFactors(side=side, ups=ups, downs=downs, losses=losses)


def _refit(weight: torch.Tensor, gram: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """argmin_B ‖(W − B A) X ᵀ‖² = W G Aᵀ (A G Aᵀ)⁻¹ for the fixed shared A (float64)."""
    w, g = weight.detach().double().to(basis.device), gram.detach().double().to(basis.device)
    ga = g @ basis.T  # [in, k]
    system = basis @ ga  # A G Aᵀ [k, k]
    ridge = _RIDGE * float(system.diagonal().mean().clamp(min=1e-300))
    system = system + ridge * torch.eye(system.shape[0], dtype=system.dtype, device=system.device)
    return torch.linalg.solve(system, (w @ ga).T).T  # system is symmetric: (W G Aᵀ) S⁻¹


def relative_loss(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − B·A) Xᵀ‖² / ‖W Xᵀ‖² from the Gram G = XᵀX (any positive multiple of it)."""
    w = weight.detach().double()
    g = gram.detach().double().to(w.device)
    diff = w - up.double().to(w.device) @ down.double().to(w.device)
    total = float(((w @ g) * w).sum())
    return float(((diff @ g) * diff).sum()) / total if total > 0 else 0.0


def layer_factors(weight: torch.Tensor, gram: torch.Tensor, side: str, rank: int,
                  shared: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, A) of one layer on its own Gram `gram`, given its group's `shared` factor (None: a group
    of one, plain SVD-LLM at `rank`). Side "in": B refit in closed form for the shared A; side
    "out": A = Bᵀ W, the projection on the shared orthonormal basis (no Gram can improve it).
    This is how the sequential update re-fits a layer on the inputs the compressed layers before
    it produce (SVD-LLM's update, kompakt.passes.share_basis)."""
    if shared is None:
        factors = svd.factorize(weight, rank, svd.whitening(gram))
        return factors.up, factors.down
    if side == "in":
        return _refit(weight, gram, shared.double()).float(), shared.float()
    return shared.float(), (shared.double().T @ weight.detach().double().to(shared.device)).float()
