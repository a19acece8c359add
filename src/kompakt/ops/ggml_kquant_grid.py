"""llama.cpp's K-quant types (q2_k .. q6_k) as a GPTQ grid whose file bytes are exact.

A K-quant super-block (256 consecutive weights of a row) stores fp16 d (and dmin) and a small
integer scale (and min) per 16- or 32-weight sub-block, so one GPTQ group is one super-block
but the grid changes every sub-block. `KQuantGrid.fit` runs llama.cpp's own scale search
(`kompakt.ops.ggml_kquants`) on the super-block's *current* weights (GPTQ-updated when the
column loop reaches it) and keeps the resulting header; each column is then rounded to the
nearest point of its sub-block's fixed grid (`column_params`, the optional `Grid` method for
scales that vary inside a group).

The header bytes travel in `GroupParams.stored` (GPTQResult.stored after GPTQ), because the
dense weights do not determine them (a sub-block scale of 0, a d that several sc could give):
`KQuantGrid.pack(codes, stored)` writes the tensor's exact GGUF bytes, which llama.cpp
dequantizes to exactly GPTQ's weights. Without GPTQ's updates (identity Hessian) the bytes
are llama-quantize's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kompakt.ops.ggml_kquants import (
    F32,
    HEADER,
    KQUANT_TYPES,
    QK_K,
    header_floats,
    pack_kquant,
    quantize_kquant,
    unpack_k4,
    unpack_q3_scales,
)
from kompakt.ops.quant import GroupParams

# name -> (weights per sub-block, largest code, code of 0 for the signed types)
_LAYOUT = {
    "q2_k": (16, 3, None),
    "q3_k": (16, 7, 4),
    "q4_k": (32, 15, None),
    "q5_k": (32, 31, None),
    "q6_k": (16, 63, 32),
}


def header_of(blocks: np.ndarray, name: str) -> np.ndarray:
    """The header bytes (uint8 [nb, HEADER[name]]) of block bytes [nb, block_bytes]."""
    if name == "q2_k":
        return np.concatenate([blocks[:, :16], blocks[:, 80:84]], axis=1)
    if name in ("q4_k", "q5_k"):
        return blocks[:, :16]
    return blocks[:, -HEADER[name] :]


def sub_block_params(header: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Each sub-block's effective (scale, min) from a header, float32 [nb, n_sub] each, with
    ggml's float32 products (exact): weight = scale·code − min (q2/q4/q5) or
    scale·(code − zero code) (q3/q6, min None)."""
    d, dmin = header_floats(header, name)
    if name == "q2_k":
        sc = header[:, :16]
        return d[:, None] * (sc & 0xF).astype(F32), dmin[:, None] * (sc >> 4).astype(F32)
    if name in ("q4_k", "q5_k"):
        ls, lm = unpack_k4(header[:, 4:16])
        return d[:, None] * ls.astype(F32), dmin[:, None] * lm.astype(F32)
    if name == "q3_k":
        sc = unpack_q3_scales(header[:, :12]).astype(F32) - F32(32)
        return d[:, None] * sc, None
    return d[:, None] * header[:, :16].view(np.int8).astype(F32), None


@dataclass(frozen=True)
class KQuantGrid:
    """A K-quant type as a `kompakt.ops.quant.Grid`: groups are 256-column super-blocks.

    GroupParams: scale [out, n_sub] and zero [out, n_sub] (the subtracted min; None for the
    signed q3_k / q6_k) are the effective per-sub-block values; stored [out, HEADER] uint8 is
    the super-block header as the file holds it. Codes are unsigned as stored (q3_k: 0..7 for
    -4..3, q6_k: 0..63 for -32..31).
    """

    name: str = "q4_k"

    def __post_init__(self) -> None:
        key = self.name.lower()
        if key not in KQUANT_TYPES:
            choices = ", ".join(KQUANT_TYPES)
            raise ValueError(f"unknown K-quant {self.name!r}; choose one of {choices}")
        object.__setattr__(self, "name", key)

    @property
    def sub_block(self) -> int:
        return _LAYOUT[self.name][0]

    def group_size_for(self, in_features: int) -> int:
        if in_features % QK_K:
            raise ValueError(
                f"{self.name} needs rows that are a multiple of {QK_K}, got {in_features}"
            )
        return QK_K

    def fit(self, w: torch.Tensor) -> GroupParams:
        """llama.cpp's reference search on `w` [out, 256] (the super-block's current weights)."""
        data = w.detach().float().cpu().numpy()
        header = header_of(quantize_kquant(data, self.name), self.name)
        scale, zero = sub_block_params(header, self.name)

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(w.device)

        return GroupParams(tensor(scale), None if zero is None else tensor(zero), tensor(header))

    def column_params(self, params: GroupParams, j: int) -> GroupParams:
        """The grid of the group's column `j`: its sub-block's scale and min."""
        s = j // self.sub_block
        zero = None if params.zero is None else params.zero[:, s]
        return GroupParams(params.scale[:, s], zero)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Nearest code on one sub-block's grid (`params` from column_params), as the
        reference's final pass rounds: round((x + min) / scale); scale 0 gives code 0."""
        _, top, zero_code = _LAYOUT[self.name]
        scale = params.scale.unsqueeze(-1)
        x = w.float() if params.zero is None else w.float() + params.zero.unsqueeze(-1)
        q = torch.round(x / torch.where(scale == 0, torch.ones_like(scale), scale))
        q = q + (zero_code or 0)
        q = torch.where(scale == 0, torch.zeros_like(q), q.clamp(0, top))
        return q.to(torch.int32)

    def decode(self, q: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """float32 weights as llama.cpp computes them: scale·q − min, or scale·(q − zero code)."""
        zero_code = _LAYOUT[self.name][2]
        scale = params.scale.unsqueeze(-1)
        if zero_code is not None:
            return scale * (q.float() - zero_code)
        return scale * q.float() - params.zero.unsqueeze(-1)

    def pack(self, codes: torch.Tensor, stored: torch.Tensor) -> np.ndarray:
        """GGUF bytes uint8 [out, row_bytes] from codes [out, in] and the groups' headers
        [out, in / 256, HEADER] (GPTQResult.codes / .stored)."""
        out_features, in_features = codes.shape
        header = stored.cpu().numpy().astype(np.uint8).reshape(-1, HEADER[self.name])
        blocks = codes.cpu().numpy().reshape(-1, QK_K)
        return pack_kquant(header, blocks, self.name).reshape(out_features, -1)
