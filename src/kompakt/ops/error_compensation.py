"""Low-rank correction of a compression error in the eigenspace of the layer's inputs (EoRA).

EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation", arXiv:2410.21271), as LQER (Zhang et al. 2024) and QERA (Zhang et al.
2025, the exact closed form) do: a quantized Linear W_q [out, in] misses E = W − W_q. A plain SVD
of E keeps the directions where E is large, but what matters is the output error ‖E X‖ on the
inputs the layer sees. With the input covariance C = XᵀX / n = Q Λ Qᵀ:

    ‖(E − B A) X‖² / n = ‖(E − B A) Q Λ^{1/2}‖²_F

so the best rank-r B A is the truncated SVD of E' = E Q Λ^{1/2}, projected back with Λ^{-1/2} Qᵀ:
E' ≈ U_r S_r V_rᵀ, B = U_r S_r^{1/2} [out, r], A = S_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ [r, in] (the split
of S between the factors is the reference implementation's). The discarded singular values
S_{r+1}² + ... are exactly the output error left per token: the global rank allocation below
spends a budget where they are largest.

When the quantized layer reads rescaled inputs (quant.awq folded 1/s into the norm or the
producer before it, and s into the weight it then quantized), W − W_q compares weights in
different coordinates. AWQ's change is diagonal, so the reference is taken in the quantized
layer's coordinates, W diag(g), with g the per-channel gain from the quantized layer's inputs to
the reference's: g_j = ‖x_o,j‖ / ‖x_q,j‖ over the calibration tokens (exact for norm-fed
Linears, an estimate where the producer was quantized too; the least-squares ⟨x_o, x_q⟩ / ‖x_q‖²
was tried and gives negative, noisy gains on weakly excited channels). A full
regression W G C⁻¹ (G = X_oᵀX_q) would also try to undo the upstream layers' errors through an
in × in fit; measured on SmolLM2 AWQ+GPTQ q4_0 it overfits the calibration set and ruins the
model (KL 0.11 -> 9), so only the diagonal is used. The output side changes too where AWQ folded
1/s into this Linear's rows (v_proj for o_proj's scales, up_proj for down_proj's): without it the adapter "corrected"
v_proj's outputs back to the unscaled ones, o_proj then read them s times too large, and KL on
SmolLM2 rose from 0.04 to 1.36 (4 layers). Each reference row is therefore multiplied by its
least-squares scale to the quantized row: AWQ's 1/s, 1 up to the rounding elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Eigenspace:
    """The whitening of one Linear's inputs: C + λI = Q Λ Qᵀ (float64)."""

    q: torch.Tensor  # [in, in] eigenvectors
    sqrt_eig: torch.Tensor  # [in] Λ^{1/2} (clamped > 0)

    @classmethod
    def of(cls, covariance: torch.Tensor, damp: float = 0.01) -> Eigenspace:
        """`covariance` C [in, in] (XᵀX / n); `damp` × mean(diag C) is added, as GPTQ damps its
        Hessian, so directions the calibration never excited are not amplified by Λ^{-1/2}."""
        c = covariance.double()
        c = c + torch.eye(c.shape[0], dtype=c.dtype, device=c.device) * (damp * c.diagonal().mean().clamp_min(1e-12))
        eig, q = torch.linalg.eigh(c)
        floor = eig.max().clamp_min(1e-12) * 1e-10  # fp noise can make tiny eigenvalues negative
        return cls(q=q, sqrt_eig=eig.clamp_min(floor).sqrt())


@dataclass
class Spectrum:
    """The whitened SVD of one Linear's error, kept up to `max_rank` components.

    `singular` [k]: descending; singular² is the output error (per token) each component
    removes. `reference_energy`: ‖W X_o‖² / n, to compare layers by their relative error.
    """

    u: torch.Tensor  # [out, k]
    singular: torch.Tensor  # [k]
    v_back: torch.Tensor  # [k, in]: V_kᵀ Λ^{-1/2} Qᵀ
    total_energy: float  # ‖E'‖²_F: the output error with no correction
    reference_energy: float

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, rank], A [rank, in]) in float32, B A the best rank-`rank` correction."""
        root = self.singular[:rank].sqrt()
        b = self.u[:, :rank] * root
        a = root[:, None] * self.v_back[:rank]
        return b.float().contiguous(), a.float().contiguous()

    def left_error(self, rank: int) -> float:
        """Output error per token left after a rank-`rank` correction."""
        return max(self.total_energy - float(self.singular[:rank].square().sum()), 0.0)


def channel_gains(reference_sq: torch.Tensor, covariance_diag: torch.Tensor) -> torch.Tensor:
    """g [in]: (Σ x_o² / Σ x_q²)^½ per input channel (1 where the calibration never excited it)."""
    live = (covariance_diag > covariance_diag.max().clamp_min(1e-30) * 1e-12) & (reference_sq > 0)
    return torch.where(live, (reference_sq / covariance_diag.clamp_min(1e-30)).sqrt(), torch.ones_like(covariance_diag))


def output_error(
    weight: torch.Tensor,
    quantized: torch.Tensor,
    covariance: torch.Tensor,
    gains: torch.Tensor | None = None,
    damp: float = 0.01,
) -> tuple[torch.Tensor, Eigenspace]:
    """(E [out, in], eigenspace of C): E = W diag(g) − W_q, see the module docstring.

    `weight` W of the reference, `quantized` W_q, `covariance` C = X_qᵀX_q / n of the quantized
    layer's inputs, `gains` g (None: the same inputs, EoRA's E = W − W_q).
    """
    space = Eigenspace.of(covariance, damp)
    return quantized_coordinates(weight, quantized, gains) - quantized.double(), space


def quantized_coordinates(weight: torch.Tensor, quantized: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
    """The reference W in the quantized Linear's coordinates (float64), see the module docstring:
    W diag(g) on the input side, and each row times its least-squares scale to W_q's row, which
    applies AWQ's fold of 1/s into this Linear's rows (v_proj, up_proj) and is 1 up to the
    rounding elsewhere. Without `gains` (the same inputs) W itself, EoRA's reference."""
    if gains is None:
        return weight.double()
    reference = weight.double() * gains.double()
    # W_q's row ≈ c · reference row + rounding: c = ⟨r, q⟩ / ‖r‖², unbiased when the rounding is
    # uncorrelated with the row (‖q‖² in the denominator would shrink every c by the error's share)
    rows = (reference * quantized.double()).sum(1) / reference.square().sum(1).clamp_min(1e-30)
    return reference * rows[:, None]


def whitened_svd(error: torch.Tensor, space: Eigenspace, max_rank: int, reference_energy: float = 0.0) -> Spectrum:
    """The SVD of E Q Λ^{1/2}, kept to `max_rank` components (see the module docstring).

    `reference_energy`: ‖W X_o‖² / n of the reference Linear (for `allocate_ranks`).
    """
    scaled = (error.double() @ space.q) * space.sqrt_eig  # E' [out, in]
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    k = min(max_rank, s.numel())
    v_back = (vh[:k] / space.sqrt_eig) @ space.q.T  # V_kᵀ Λ^{-1/2} Qᵀ
    return Spectrum(u=u[:, :k], singular=s[:k], v_back=v_back, total_energy=float(s.square().sum()),
                    reference_energy=reference_energy)  # fmt: skip


def plain_svd(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the truncated SVD of E itself: the baseline EoRA improves on (no inputs seen)."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def allocate_ranks(spectra: dict[str, Spectrum], budget: int, max_rank: int) -> dict[str, int]:
    """Ranks per Linear that remove the most relative output error for `budget` parameters.

    The rule: every component i of Linear l costs in_l + out_l parameters and removes
    s_i² / ‖W_l X_o‖² of that Linear's output (its share of the layer's own output energy, so
    a layer with large activations does not take the whole budget); components are taken
    greedily by that gain per parameter until the budget is spent, at most `max_rank` per
    Linear. The s_i are descending, so the greedy choice is optimal for this objective. A Linear
    may get rank 0 (no adapter).
    """
    candidates: list[tuple[float, str, int]] = []
    for name, spec in spectra.items():
        cost = spec.u.shape[0] + spec.v_back.shape[1]
        norm = spec.reference_energy if spec.reference_energy > 0 else max(spec.total_energy, 1e-30)
        gains = spec.singular[:max_rank].double().square() / norm / cost
        candidates += [(float(g), name, cost) for g in gains]
    candidates.sort(key=lambda item: item[0], reverse=True)
    ranks = dict.fromkeys(spectra, 0)
    spent = 0
    for _, name, cost in candidates:  # descending gain; within a Linear that is index order
        if spent + cost > budget:
            continue
        ranks[name] += 1
        spent += cost
    return ranks
