"""AWQ scale and clipping search (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", arXiv:2306.00978), as pure tensor math.

A few input channels carry much larger activations than the rest; their weights matter most.
AWQ multiplies those weight columns by s_j > 1 before quantization and divides the inputs by
s_j (folded into the preceding op, so the float model is unchanged): W·x = (W·diag(s))·(x/s).
The relative rounding error of the salient columns shrinks. s = mean|x|^α, normalised
(s / √(max s · min s)), with α chosen on a grid in [0, 1] to minimise the quantized output error.
α = 0 is s = 1 (no scaling), so the search never does worse than plain RTN on its objective.

Objective: the output error of the Linears that read the scaled input,
    Σ_layers ‖X Wᵀ − (X/s) Q(W·diag(s))ᵀ‖²  =  Σ tr(Δ G Δᵀ),  Δ = W − Q(W·diag(s))·diag(1/s),
with G = XᵀX the input Gram matrix (any positive multiple, e.g. GPTQ's Hessian). This is exact
over all calibration tokens and costs out·in² per trial, independent of the token count
(the reference runs the block on a token subset instead; its block output includes attention's
softmax, which this Linear-output objective leaves out).

Clipping (AWQ's `auto_clip`): per output row and group, shrink the clipping range to
max|w|·r (r on a grid in [1 − max_shrink, 1]) when that lowers the group's output error
Δ_g G_gg Δ_gᵀ (the block-diagonal part of the objective, as in the reference).

`quantize` arguments are callables w [out, in] -> dequantized w (the target grid's RTN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(Δ G Δᵀ) = Σ over samples of ‖X Δᵀ‖²  (Δ [out, in], G [in, in])."""
    return ((delta @ gram) * delta).sum()


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α normalised so that max·min = 1 (the reference's normalisation)."""
    s = act_mean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    """The chosen scales [in] (expanded to every input column), α, and the errors at α and α = 0."""

    scales: torch.Tensor
    alpha: float
    error: float
    base_error: float


def search_scales(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    act_mean: torch.Tensor,
    quantize: Quantizer | Sequence[Quantizer],
    *,
    n_grid: int = 20,
    expand: torch.Tensor | None = None,
) -> ScaleSearch:
    """Grid search of α for the Linears `weights` (each [out_i, in]) sharing the input with Gram `gram`.

    Args:
        act_mean: mean |x| per scaled channel [k] (k = in, or fewer when `expand` ties channels).
        quantize: the target grid's RTN (dequantized result), or one per weight when they are
            quantized to different grids (per-tensor types).
        n_grid: α takes the values i / n_grid, i = 0..n_grid.
        expand: LongTensor [in] mapping each input column to its scale (e.g. one scale per
            KV-head channel repeated over the query heads that read it); None = identity.
    """
    gram = gram.float()
    ws = [w.detach().float() for w in weights]
    quantizers = list(quantize) if isinstance(quantize, Sequence) else [quantize] * len(ws)
    best: ScaleSearch | None = None
    base = 0.0
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = awq_scales(act_mean, alpha)
        full = s if expand is None else s[expand]
        err = 0.0
        for w, q in zip(ws, quantizers, strict=True):
            delta = w - q(w * full) / full
            err += float(output_error(delta, gram))
        if i == 0:
            base = err
        if best is None or err < best.error:
            best = ScaleSearch(full, alpha, err, base)
    assert best is not None
    best.base_error = base
    return best


def search_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    quantize: Quantizer,
    group_size: int,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """The clipped weight [out, in]: each (row, group) clamped to ±max|w|·r with the best r."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    n_groups = in_features // group_size
    gram = gram.float()
    wg = w.reshape(out_features, n_groups, group_size)  # [out, G, g]
    max_val = wg.abs().amax(dim=-1, keepdim=True)  # [out, G, 1]
    best_err = torch.full((out_features, n_groups), float("inf"), device=w.device)
    best_max = max_val.clone()
    blocks = [gram[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size] for g in range(n_groups)]
    for i in range(int(max_shrink * n_grid) + 1):
        limit = max_val * (1 - i / n_grid)
        clipped = torch.maximum(torch.minimum(wg, limit), -limit).reshape(out_features, in_features)
        delta = (w - quantize(clipped)).reshape(out_features, n_groups, group_size)
        err = torch.stack([((delta[:, g] @ blocks[g]) * delta[:, g]).sum(-1) for g in range(n_groups)], dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), limit, best_max)
    return torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(out_features, in_features)
