"""Recover exact GGUF block parameters from weights that already lie on a 32-weight block grid.

A quant pass with `format: q4_0` leaves fp32 weights w = (q - 8)·d with an fp16 d per 32-weight
block (kompakt.ops.gguf_grid). Re-quantizing them with llama.cpp's reference rule
(d = signed absmax / -8) reproduces them only when the block uses code 0 (the value -8·d);
after GPTQ's error feedback many blocks do not, and re-rounding would move those weights.
So the exporter searches, per block, for any fp16 d (and m) under which every weight is
exactly a code. Different (q, d, m) that give the same values are equally good: what
llama.cpp computes is the dequantized value.

- q8_0 / q4_0 / q5_0 (w = q·d): one of d = ±absmax / k (k = 1..127 / 8 / 16) always works for
  on-grid values (absmax = k·|d| exactly in fp32).
- q4_1 / q5_1 (w = q·d + m, rounded in fp32): the block's codes span j levels from its lowest
  code q0, so d = fp16(span / j) and m = fp16(min - q0·d); the search tries the (j, q0) that
  leave fewest levels unused first (GPTQ rarely leaves many).
- iq4_nl (w = d·K[q], K the 16-entry table): the value of largest magnitude is d·K[q] exactly,
  so d = that value / K[i] for one of the 16 entries.

A block that no candidate reproduces is reported as not recovered and re-quantized by the caller.
"""

from __future__ import annotations

import torch

from kompakt.ops.ggml_iq4nl import KVALUES
from kompakt.ops.gguf_grid import BLOCK, quantize_blocks

_CODE_RANGE = {"q8_0": (-127, 127), "q4_0": (-8, 7), "q5_0": (-16, 15)}  # signed codes
_OFFSET = {"q4_0": 8, "q5_0": 16}  # stored code = signed code + offset
_LEVELS = {"q4_1": 15, "q5_1": 31}
_ROWS_PER_CHUNK = 256


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _fp16_exact(x: torch.Tensor) -> torch.Tensor:
    return _fp16(x) == x


def _recover_symmetric(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [r, nb, 32] -> (signed codes [r, nb, 32], d [r, nb], ok [r, nb])."""
    lo, hi = _CODE_RANGE[fmt]
    absmax = blocks.abs().amax(dim=-1)  # [r, nb]
    d = torch.zeros_like(absmax)
    codes = torch.zeros_like(blocks)
    ok = absmax == 0  # an all-zero block is exact with d = 0
    tiny = torch.finfo(torch.float32).tiny
    # Both signs: llama.cpp's q4_0 d = max / -8 is negative when a block's largest-magnitude
    # weight is positive (the code range [-8, 7] is asymmetric), so +8|d| needs d < 0.
    for k in range(-lo, 0, -1):  # smallest |d| first: a pass's own d is usually found at once
        for sign in (1.0, -1.0):
            todo = ~ok
            if not todo.any():
                return codes, d, ok
            cand = sign * absmax / k
            q = torch.round(blocks / (sign * cand.abs().clamp(min=tiny)).unsqueeze(-1))
            exact = (q * cand.unsqueeze(-1) == blocks).all(dim=-1) & (q >= lo).all(-1) & (q <= hi).all(-1)
            good = todo & exact & _fp16_exact(cand) & (cand != 0)
            d = torch.where(good, cand, d)
            codes = torch.where(good.unsqueeze(-1), q, codes)
            ok |= good
    return codes, d, ok


def _recover_asymmetric(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, ...]:
    """blocks [r, nb, 32] -> (codes, d, m, ok) for x = q·d + m with codes 0..levels."""
    flat = blocks.reshape(-1, BLOCK)  # [B, 32]
    low = flat.amin(dim=-1)
    span = flat.amax(dim=-1) - low
    d, m, codes = torch.zeros_like(low), low.clone(), torch.zeros_like(flat)
    ok = (span == 0) & _fp16_exact(low)  # a constant block: d = 0, m = its value
    pairs = [(unused, q0) for unused in range(levels) for q0 in range(unused + 1)]
    for unused, q0 in pairs:  # levels the codes leave unused, fewest first; q0 of them below
        todo = torch.nonzero(~ok).squeeze(-1)
        if todo.numel() == 0:
            break
        x = flat[todo]
        cand_d = _fp16(span[todo] / (levels - unused))
        cand_m = _fp16(low[todo] - q0 * cand_d)
        q = torch.round((x - cand_m.unsqueeze(-1)) / cand_d.clamp(min=1e-30).unsqueeze(-1))
        back = q * cand_d.unsqueeze(-1) + cand_m.unsqueeze(-1)
        good = (back == x).all(-1) & (q >= 0).all(-1) & (q <= levels).all(-1) & (cand_d > 0)
        hit = todo[good]
        d[hit], m[hit], codes[hit], ok[hit] = cand_d[good], cand_m[good], q[good], True
    shape = blocks.shape[:-1]
    return codes.reshape(blocks.shape), d.reshape(shape), m.reshape(shape), ok.reshape(shape)


def _recover_iq4_nl(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [r, nb, 32] -> (table indices, d, ok) for x = d·K[q]."""
    table = torch.from_numpy(KVALUES)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # signed
    d = torch.zeros_like(peak)
    codes = torch.full_like(blocks, 8.0)  # the reference's index of 0 (an all-zero block)
    ok = peak == 0
    for value in table.tolist():
        todo = ~ok
        if not todo.any():
            break
        cand = peak / value
        values = table * cand[..., None]  # [r, nb, 16]: exactly what llama.cpp decodes
        q = (blocks.unsqueeze(-1) - values.unsqueeze(-2)).abs().argmin(dim=-1)  # [r, nb, 32]
        back = torch.gather(values, -1, q)
        good = todo & (back == blocks).all(-1) & _fp16_exact(cand) & (cand != 0)
        d = torch.where(good, cand, d)
        codes = torch.where(good.unsqueeze(-1), q.float(), codes)
        ok |= good
    return codes, d, ok


def _recover_chunk(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored codes, d, m or None, ok) of blocks [r, nb, 32]."""
    if fmt in _LEVELS:
        return _recover_asymmetric(blocks, _LEVELS[fmt])
    if fmt == "iq4_nl":
        codes, d, ok = _recover_iq4_nl(blocks)
        return codes, d, None, ok
    codes, d, ok = _recover_symmetric(blocks, fmt)
    return codes + _OFFSET.get(fmt, 0), d, None, ok


def recover_blocks(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(q, d, m, n_requantized) for an on-grid weight [out, in] in the layout of gguf_grid.

    Blocks that are not exactly on a grid of `fmt` take llama.cpp's reference quantization;
    their count is returned so the caller can say so.
    """
    w = w.detach().float().cpu()
    ref_q, ref_d, ref_m = quantize_blocks(w, fmt)
    out_features, in_features = w.shape
    qs, ds, ms, missed = [], [], [], 0
    for start in range(0, out_features, _ROWS_PER_CHUNK):
        rows = slice(start, min(start + _ROWS_PER_CHUNK, out_features))
        blocks = w[rows].reshape(-1, in_features // BLOCK, BLOCK)
        codes, d, m, ok = _recover_chunk(blocks, fmt)
        if m is not None:
            ms.append(torch.where(ok, m, ref_m[rows]))
        ref_codes = ref_q[rows].reshape(codes.shape).float()
        qs.append(torch.where(ok.unsqueeze(-1), codes, ref_codes).reshape(-1, in_features))
        ds.append(torch.where(ok, d, ref_d[rows]))
        missed += int((~ok).sum())
    m_all = torch.cat(ms) if ms else None
    return torch.cat(qs).to(torch.int32), torch.cat(ds), m_all, missed
