"""Sparsity masks from importance scores, and magnitude pruning.

Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks") keeps the weights of largest |w|; it is the baseline Wanda and SparseGPT
are measured against, and the right choice only when no calibration data is available.

Conventions shared by magnitude, Wanda and SparseGPT:
- A mask is bool [out, in], True = weight kept; pruned weight = weight · mask.
- `sparsity` is the pruned fraction in [0, 1); exactly int(count · sparsity) weights of each
  comparison group are pruned (ties broken by column index, lowest first).
- `nm=(n, m)`: keep n of every m consecutive weights along the input dimension (NVIDIA 2:4
  semantics; sparsity 1 − n/m). The reference Wanda/SparseGPT code names the *pruned* count
  instead; for 2:4 and 4:8 both readings agree. m must divide in_features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Pruned(NamedTuple):
    weight: torch.Tensor
    mask: torch.Tensor


def check_sparsity(sparsity: float | None, nm: tuple[int, int] | None, in_features: int) -> None:
    """Validate the target: exactly one of sparsity and nm, each in range (ValueError otherwise)."""
    if (sparsity is None) == (nm is None):
        raise ValueError("give either a sparsity fraction or an N:M pattern, not both or neither")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity}"
        )
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"N:M pattern needs 0 < N < M (keep N of every M), got {n}:{m}")
        if in_features % m:
            raise ValueError(
                f"N:M pattern {n}:{m} needs the input dimension to be a multiple of {m},"
                f" got {in_features}"
            )


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of each row of `scores` (stable: lowest index on ties)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def mask_from_scores(
    scores: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    per_row: bool = True,
) -> torch.Tensor:
    """Keep-mask [out, in] that prunes the lowest scores.

    Unstructured: per output row (`per_row`, Wanda's comparison group) or over the whole
    matrix. N:M: always within each row's groups of m consecutive columns.
    """
    out_features, in_features = scores.shape
    check_sparsity(sparsity, nm, in_features)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(out_features, in_features // m, m)  # [out, in/m, m]
        drop = torch.zeros_like(groups, dtype=torch.bool)
        drop.scatter_(-1, _lowest(groups, m - n), True)
        return ~drop.reshape(out_features, in_features)
    if per_row:
        mask.scatter_(1, _lowest(scores, int(in_features * sparsity)), False)
        return mask
    flat = mask.reshape(-1)
    flat[_lowest(scores.reshape(-1), int(scores.numel() * sparsity))] = False
    return mask


def magnitude_prune(
    weight: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    per_row: bool = False,
) -> Pruned:
    """Prune the smallest |w| (over the whole matrix by default, as in the classic method)."""
    scores = weight.detach().abs().float()
    mask = mask_from_scores(scores, sparsity=sparsity, nm=nm, per_row=per_row)
    return Pruned(weight * mask, mask)
