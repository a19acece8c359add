"""Recover exact GGUF block parameters from weights that already lie on a q4_0 / q8_0 / q4_1 grid.

A quant pass with `format: q4_0` leaves fp32 weights w = (q - 8)·d with an fp16 d per 32-weight
block (kompakt.ops.gguf_grid). Re-quantizing them with llama.cpp's reference rule
(d = signed absmax / -8) reproduces them only when the block uses code 0 (the value -8·d);
after GPTQ's error feedback many blocks do not, and re-rounding would move those weights.
So the exporter searches, per block, for any fp16 d (and m) under which every weight is
exactly a code: for q4_0 / q8_0 one of d = absmax / k (k = 1..8 resp. 1..127) always works
for on-grid values (absmax = k·d exactly in fp32). Different (q, d) pairs that give the same
values are equally good: what llama.cpp computes is the dequantized value.

q4_1 (w = q·d + m, rounded in fp32) is recovered when the block's minimum is m itself (code 0
used); other blocks are reported as not recovered and re-quantized by the caller.
"""

from __future__ import annotations

import torch

from kompakt.ops.gguf_grid import BLOCK, quantize_blocks

_CODE_RANGE = {"q8_0": (-127, 127, 127), "q4_0": (-8, 7, 8)}  # (min code, max code, largest |code|)
_ROWS_PER_CHUNK = 256


def _fp16_exact(x: torch.Tensor) -> torch.Tensor:
    return x.half().float() == x


def _recover_symmetric(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [r, nb, 32] -> (codes [r, nb, 32] signed, d [r, nb], ok [r, nb])."""
    lo, hi, kmax = _CODE_RANGE[fmt]
    absmax = blocks.abs().amax(dim=-1)  # [r, nb]
    d = torch.zeros_like(absmax)
    codes = torch.zeros_like(blocks)
    ok = absmax == 0  # an all-zero block is exact with d = 0
    tiny = torch.finfo(torch.float32).tiny
    # Both signs: llama.cpp's q4_0 d = max / -8 is negative when a block's largest-magnitude
    # weight is positive (the code range [-8, 7] is asymmetric), so +8|d| needs d < 0.
    for k in range(kmax, 0, -1):  # smallest |d| first: a pass's own d is usually found at once
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


def _recover_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    low = blocks.amin(dim=-1)
    span = blocks.amax(dim=-1) - low
    d = torch.zeros_like(low)
    codes = torch.zeros_like(blocks)
    ok = (span == 0) & _fp16_exact(low)
    for k in range(15, 0, -1):
        todo = ~ok
        if not todo.any():
            break
        cand = (span / k).half().float()
        q = torch.round((blocks - low.unsqueeze(-1)) / cand.clamp(min=1e-30).unsqueeze(-1))
        back = q * cand.unsqueeze(-1) + low.unsqueeze(-1)
        exact = (back == blocks).all(-1) & (q >= 0).all(-1) & (q <= 15).all(-1)
        good = todo & exact & _fp16_exact(low) & (cand > 0)
        d = torch.where(good, cand, d)
        codes = torch.where(good.unsqueeze(-1), q, codes)
        ok |= good
    return codes, d, low, ok


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
        if fmt == "q4_1":
            codes, d, m, ok = _recover_q4_1(blocks)
            ms.append(torch.where(ok, m, ref_m[rows]))
        else:
            codes, d, ok = _recover_symmetric(blocks, fmt)
            if fmt == "q4_0":
                codes = codes + 8  # stored codes are q + 8 in 0..15
        ref_codes = ref_q[rows].reshape(codes.shape).float()
        qs.append(torch.where(ok.unsqueeze(-1), codes, ref_codes).reshape(-1, in_features))
        ds.append(torch.where(ok, d, ref_d[rows]))
        missed += int((~ok).sum())
    m_all = torch.cat(ms) if fmt == "q4_1" else None
    return torch.cat(qs).to(torch.int32), torch.cat(ds), m_all, missed
