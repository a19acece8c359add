"""llama.cpp's 32-weight block formats, bit-exact with ggml's reference quantizer.

Source: ggml-quants.c (`quantize_row_q8_0_ref`, `..._q4_0_ref`, `..._q4_1_ref`, `..._q5_0_ref`,
`..._q5_1_ref`, `quantize_iq4_nl`) and its numpy twins (gguf-py `gguf.quants`,
kompakt.ops.ggml_iq4nl). Every block holds 32 consecutive weights of a row (along the input
dimension) and fp16 parameters:

- q8_0: d = max|x| / 127, q = roundf(x / d) in [-127, 127], x ≈ q·d.
- q4_0 / q5_0: d = max / -8 (-16) (max = the signed value of largest magnitude),
  q = min(15 (31), trunc(x/d + 8.5 (16.5))), x ≈ (q - 8 (16))·d; q5_0 keeps each code's 5th
  bit in a 32-bit qh.
- q4_1 / q5_1: d = (max - min) / 15 (31), m = min, q = trunc((x - min)/d + 0.5),
  x ≈ q·d + m (q5_1: 5th bits in qh).
- iq4_nl: d from a small scale search, q = the index of the nearest entry of a fixed
  non-linear 16-value table (ggml_iq4nl.KVALUES), x ≈ d·KVALUES[q].

The reference quantizer computes q with the unrounded fp32 d, but the file stores d (and m)
in fp16, so the grid a weight lands on uses the fp16-rounded d. `quantize_blocks` reproduces
the reference bit for bit (RTN, what `llama-quantize` does without an imatrix);
`GGUFBlockGrid` is the same grid as a `kompakt.ops.quant.Grid` for GPTQ: it fits d (and m)
from a block's current weights and rounds to the nearest point of the stored fp16 grid.
`pack_blocks` turns (q, d, m) into the exact bytes of a GGUF tensor, so an exporter writes what
GPTQ optimised, with no re-quantization.

Use these grids when the model is meant for llama.cpp / Ollama; rows must be a multiple of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kompakt.ops import ggml_iq4nl
from kompakt.ops.ggml_types import ASYMMETRIC
from kompakt.ops.quant import GroupParams, signed_absmax

BLOCK = 32
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
CODE_BITS = {"q8_0": 8, "q5_0": 5, "q5_1": 5, "q4_0": 4, "q4_1": 4, "iq4_nl": 4}  # bits per code
_OFFSET = {"q4_0": 8, "q5_0": 16}  # stored code = q + offset; d = signed max / -offset
_LEVELS = {"q4_1": 15, "q5_1": 31}  # largest code of the asymmetric formats
_KVALUES = torch.from_numpy(ggml_iq4nl.KVALUES)


def _check(w: torch.Tensor, fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown GGUF block format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(
            f"GGUF block formats need a 2-D weight whose rows are a multiple of {BLOCK},"
            f" got {tuple(w.shape)}"
        )
    return fmt


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (as stored in the file), kept as float32."""
    return x.half().float()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d with 1/0 = 0, as the reference does (an all-zero block encodes to zeros)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), written like gguf-py's np_roundf so fp32 rounding matches."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _iq4nl_scales(blocks: torch.Tensor) -> torch.Tensor:
    """ggml's unrounded IQ4_NL scale of each block [..., 32] -> [...] (float32, same device)."""
    flat = blocks.detach().float().cpu().reshape(-1, BLOCK).numpy()
    return torch.from_numpy(ggml_iq4nl.block_scales(flat)).reshape(blocks.shape[:-1]).to(blocks.device)


def quantize_blocks(
    w: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reference RTN: `w` [out, in] -> (q int32 [out, in], d [out, in/32], m [out, in/32] or None).

    q is what the file stores (q4_0 / q4_1 / iq4_nl: 0..15; q5_0 / q5_1: 0..31; q8_0:
    -127..127); d and m are float32 tensors holding fp16 values (m only for q4_1 / q5_1).
    """
    fmt = _check(w, fmt)
    out_features, in_features = w.shape
    blocks = w.float().reshape(out_features, in_features // BLOCK, BLOCK)  # [out, nb, 32]
    m = None
    if fmt == "q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        q = _roundf(blocks * _inverse(d))
    elif fmt in _OFFSET:
        offset = _OFFSET[fmt]
        d = signed_absmax(blocks) / -offset
        q = torch.trunc(blocks * _inverse(d) + (offset + 0.5)).clamp(0, 2 * offset - 1)
    elif fmt in _LEVELS:
        low = blocks.amin(dim=-1, keepdim=True)
        d = (blocks.amax(dim=-1, keepdim=True) - low) / _LEVELS[fmt]
        q = torch.trunc((blocks - low) * _inverse(d) + 0.5).clamp(0, _LEVELS[fmt])
        m = _fp16(low).squeeze(-1)
    else:  # iq4_nl: the nearest table index with the unrounded d, ties up (ggml's best_index_int8)
        d = _iq4nl_scales(blocks).unsqueeze(-1)
        scaled = (blocks * _inverse(d)).cpu().numpy()
        q = torch.from_numpy(ggml_iq4nl.nearest_index(scaled).astype(np.int32)).to(w.device)
    return q.reshape(out_features, in_features).to(torch.int32), _fp16(d).squeeze(-1), m


def dequantize_blocks(
    q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    """float32 [out, in] from codes and block parameters, with the same fp32 arithmetic as ggml."""
    fmt = _check(q, fmt)
    out_features, in_features = q.shape
    codes = q.reshape(out_features, in_features // BLOCK, BLOCK)  # [out, nb, 32]
    x = _decode(fmt, codes, d.float().unsqueeze(-1), None if m is None else m.float().unsqueeze(-1))
    return x.reshape(out_features, in_features)


def _decode(fmt: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Values of codes q [..., k] with d (and m) broadcastable to them."""
    if fmt == "q8_0":
        return q.float() * d
    if fmt in _OFFSET:
        return (q.float() - _OFFSET[fmt]) * d
    if fmt in _LEVELS:
        if m is None:
            raise ValueError(f"{fmt} needs the block minima m")
        return q.float() * d + m
    return _KVALUES.to(q.device)[q.long()] * d


@dataclass(frozen=True)
class GGUFBlockGrid:
    """A llama.cpp block format as a GPTQ grid (groups = the 32-column blocks).

    `fit` computes the block's fp16 d (and m) from the weights it is given (GPTQ passes the
    block's updated weights when it reaches the block), with the reference's own rule (for
    iq4_nl its scale search); `encode` rounds to the nearest point of that stored grid (the
    reference rounds with the unrounded d instead, which differs by one step on a few weights
    and is never closer). `zero` in GroupParams is m for q4_1 / q5_1, else None.
    """

    fmt: str = "q4_0"

    def __post_init__(self) -> None:
        if self.fmt.lower() not in FORMATS:
            choices = ", ".join(FORMATS)
            raise ValueError(f"unknown GGUF block format {self.fmt!r}; choose one of {choices}")
        object.__setattr__(self, "fmt", self.fmt.lower())

    def group_size_for(self, in_features: int) -> int:
        if in_features % BLOCK:
            raise ValueError(
                f"{self.fmt} needs rows that are a multiple of {BLOCK}, got {in_features}"
            )
        return BLOCK

    def fit(self, w: torch.Tensor) -> GroupParams:
        w = w.float()
        if self.fmt == "q8_0":
            return GroupParams(_fp16(w.abs().amax(dim=-1) / 127), None)
        if self.fmt in _OFFSET:
            return GroupParams(_fp16(signed_absmax(w).squeeze(-1) / -_OFFSET[self.fmt]), None)
        if self.fmt in _LEVELS:
            low = w.amin(dim=-1)
            return GroupParams(_fp16((w.amax(dim=-1) - low) / _LEVELS[self.fmt]), _fp16(low))
        return GroupParams(_fp16(_iq4nl_scales(w)), None)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        d = params.scale.unsqueeze(-1)  # [out, 1]
        inv = _inverse(d)  # d = 0 -> every code means 0 (or m)
        w = w.float()
        if self.fmt == "q8_0":
            q = torch.round(w * inv).clamp(-127, 127)
        elif self.fmt in _OFFSET:
            offset = _OFFSET[self.fmt]
            q = (torch.round(w * inv) + offset).clamp(0, 2 * offset - 1)
        elif self.fmt in _LEVELS:
            q = torch.round((w - params.zero.unsqueeze(-1)) * inv).clamp(0, _LEVELS[self.fmt])
        else:  # the table entry whose stored value d·K is nearest to w: [out, k, 16] -> [out, k]
            values = _KVALUES.to(w.device) * d.unsqueeze(-1)
            q = (w.unsqueeze(-1) - values).abs().argmin(dim=-1)
        return q.to(torch.int32)

    def decode(self, q: torch.Tensor, params: GroupParams) -> torch.Tensor:
        zero = None if params.zero is None else params.zero.unsqueeze(-1)
        return _decode(self.fmt, q, params.scale.unsqueeze(-1), zero)


def pack_blocks(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: str) -> np.ndarray:
    """GGUF tensor bytes, uint8 [out, in/32 · block bytes], laid out as gguf.quants.quantize does.

    q4_0 / iq4_nl block: fp16 d, then 16 bytes with q[j] in the low and q[j + 16] in the high
    nibble; q4_1: fp16 d, fp16 m, the same 16 bytes; q5_0 / q5_1: fp16 d (, fp16 m), 4 bytes
    holding bit 4 of q[j] as bit j (little endian), then the low nibbles as in q4_0; q8_0:
    fp16 d, 32 int8.
    """
    fmt = _check(q, fmt)
    out_features, in_features = q.shape
    n_blocks = in_features // BLOCK
    d16 = d.float().numpy().astype(np.float16)
    if not np.array_equal(d16.astype(np.float32), d.float().numpy(), equal_nan=True):
        raise ValueError("block scales are not fp16 values; pass the d returned by this module")
    parts = [d16.reshape(out_features, n_blocks, 1).view(np.uint8)]  # [out, nb, 2]
    if fmt in ASYMMETRIC:
        m16 = m.float().numpy().astype(np.float16)
        parts.append(m16.reshape(out_features, n_blocks, 1).view(np.uint8))
    codes = q.numpy().reshape(out_features, n_blocks, BLOCK)
    if fmt == "q8_0":
        parts.append(codes.astype(np.int8).view(np.uint8))
    else:
        nib = codes.astype(np.uint8)
        if CODE_BITS[fmt] == 5:
            parts.append(np.packbits(nib >> np.uint8(4), axis=-1, bitorder="little"))  # qh [out, nb, 4]
            nib = nib & np.uint8(0x0F)
        parts.append(nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2 :] << np.uint8(4)))
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)


def ggml_type(fmt: str) -> int:
    """The gguf.GGMLQuantizationType of `fmt` (imported lazily: only writers need gguf)."""
    import gguf

    return gguf.GGMLQuantizationType[fmt.upper()]
