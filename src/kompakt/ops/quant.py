"""Round-to-nearest quantization on integer grids (per channel or in groups along the input dim).

`fake_quantize` returns the dequantized weight (same shape and dtype), which is what analysis
and evaluation need; packing into storage formats lives elsewhere.
"""

from __future__ import annotations

import torch


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View [out, in] as [out, n_groups, group] (group = in when per-channel)."""
    out_features, in_features = weight.shape
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return weight.reshape(out_features, 1, in_features)
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {in_features}")
    return weight.reshape(out_features, in_features // group_size, group_size)


def fake_quantize(
    weight: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True
) -> torch.Tensor:
    """Quantize `weight` [out, in] to `bits` by round-to-nearest and return it dequantized.

    Symmetric: scale = max|w| / (2^(bits-1) - 1), integers in [-(2^(bits-1)), 2^(bits-1) - 1]
    (the q8_0 / q4_0 convention uses the full negative range too). Asymmetric: scale and zero
    point from min and max, integers in [0, 2^bits - 1].
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    groups = _grouped(weight.float(), group_size)
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / q_max
        q = torch.clamp(torch.round(groups / scale), -q_max - 1, q_max)
        dequant = q * scale
    else:
        q_max = 2**bits - 1
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / q_max
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(groups / scale) + zero, 0, q_max)
        dequant = (q - zero) * scale
    return dequant.reshape(weight.shape).to(weight.dtype)
