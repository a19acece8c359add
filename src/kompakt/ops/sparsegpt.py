"""SparseGPT: one-shot pruning with an OBS weight update that reconstructs the layer output.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (arXiv:2301.00774). Columns are visited left to right in lazy blocks of 128; the
mask of a block is chosen by the OBS saliency w² / [H⁻¹]_jj² (over the whole block for
unstructured sparsity, within each group of m columns for N:M, chosen when the loop reaches
the group so that earlier updates count), each pruned weight's error is spread over the
remaining columns through the upper Cholesky factor of H⁻¹, exactly like GPTQ.

Use it when calibration data is available and quality matters (50 %+ unstructured, 2:4);
it costs one Hessian inverse per layer. Wanda (`kompakt.ops.wanda`) is the cheaper option.
Mask and N:M conventions: `kompakt.ops.sparsity_masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kompakt.ops.hessian import HessianAccumulator, drop_dead_columns, inverse_cholesky_upper
from kompakt.ops.sparsity_masks import check_sparsity, mask_from_scores


@dataclass
class SparseGPTResult:
    """weight: float32 [out, in] with exact zeros where mask is False; mask: bool, True = kept;
    loss: Σ w² / (2 · [H⁻¹]_jj) over the pruned weights (SparseGPT's error estimate)."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    damp: float


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianAccumulator,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTResult:
    """Prune `weight` [out, in] to `sparsity` (or keep n of every m: `nm`) given H [in, in].

    `hessian`: the matrix (copied), or its HessianAccumulator, whose running sum is then taken
    over and factorised in its own memory (as GPTQ does): one [in, in] matrix instead of three,
    485 MB each for a 7B MLP's down projection; the same bits either way."""
    out_features, in_features = weight.shape
    check_sparsity(sparsity, nm, in_features)
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])  # N:M groups never straddle blocks
    if isinstance(hessian, HessianAccumulator):
        h = hessian.take().float()  # a no-op for the usual fp32 accumulation
        w, h = drop_dead_columns(weight, h, copy_hessian=False)
    else:
        w, h = drop_dead_columns(weight, hessian)
    hinv, damp = inverse_cholesky_upper(h, percdamp, consume=True)
    del h
    mask = torch.ones_like(w, dtype=torch.bool)
    losses = torch.zeros(out_features, device=w.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        _prune_block(w, hinv, mask, losses, i1, i2, sparsity, nm)
    return SparseGPTResult(w, mask, float(losses.sum()), damp)


def _prune_block(
    w: torch.Tensor,
    hinv: torch.Tensor,
    mask: torch.Tensor,
    losses: torch.Tensor,
    i1: int,
    i2: int,
    sparsity: float | None,
    nm: tuple[int, int] | None,
) -> None:
    """Prune columns [i1, i2) of `w` in place, fill `mask`, push the errors to columns ≥ i2."""
    w1 = w[:, i1:i2].clone()
    err1 = torch.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    pivots = hinv1.diagonal()  # [block]
    mask1 = mask[:, i1:i2]  # a view: filling it fills `mask`
    if nm is None:
        saliency = w1.square() / pivots.square().unsqueeze(0)
        mask1.copy_(mask_from_scores(saliency, sparsity=sparsity, per_row=False))
    for i in range(i2 - i1):
        if nm is not None and i % nm[1] == 0:
            cols = slice(i, i + nm[1])
            saliency = w1[:, cols].square() / pivots[cols].square().unsqueeze(0)
            mask1[:, cols] = mask_from_scores(saliency, nm=nm)
        col = w1[:, i : i + 1]  # [out, 1]
        kept = col * mask1[:, i : i + 1]
        err = (col - kept) / hinv1[i, i]
        losses += err[:, 0].square() / 2
        w1[:, i:] -= err * hinv1[i : i + 1, i:]
        w1[:, i : i + 1] = kept  # exact zeros (the update leaves rounding noise there)
        err1[:, i : i + 1] = err
    w[:, i1:i2] = w1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
