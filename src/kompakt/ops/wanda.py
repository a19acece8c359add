"""Wanda: prune by |weight| × input-activation norm, per output row, without weight updates.

Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models" (arXiv:2306.11695). Score S_ij = |W_ij| · ‖X_j‖₂ (X = the layer's calibration input);
each output row prunes its lowest-scoring fraction (the per-output comparison group the paper
found essential), or the lowest m−n of every m consecutive weights for N:M.

Use it for fast one-shot pruning (no Hessian inverse, no update): nearly SparseGPT quality at
50 % on large models, weaker at high sparsity or on small models where SparseGPT's
reconstruction pays off. ‖X_j‖₂ comes from `HessianAccumulator.column_norms()` or, up to a
common factor that does not change the ranking, from `column_norms_from_hessian(H)`.
"""

from __future__ import annotations

import torch

from kompakt.ops.sparsity_masks import Pruned, mask_from_scores


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X_j‖₂, float32 [out, in]; `column_norms` [in]."""
    if column_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"activation norms {tuple(column_norms.shape)} do not match"
            f" weight {tuple(weight.shape)}"
        )
    return weight.detach().abs().float() * column_norms.float().unsqueeze(0)


def wanda_prune(
    weight: torch.Tensor,
    column_norms: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
) -> Pruned:
    """Pruned weight and keep-mask; unstructured sparsity is per output row."""
    scores = wanda_scores(weight, column_norms)
    mask = mask_from_scores(scores, sparsity=sparsity, nm=nm, per_row=True)
    return Pruned(weight * mask, mask)
