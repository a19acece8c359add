"""llama.cpp's K-quant encoders (q2_k, q3_k, q4_k, q5_k, q6_k), byte-identical to ggml.

gguf-py can read these types but not write them; llama.cpp writes them with
`quantize_row_q{2..6}_K_ref` when no importance matrix is given. Each type stores a row as
256-weight super-blocks: one fp16 super-scale (and fp16 super-min for q2/q4/q5) and small
integer scales (and mins) per 16- or 32-weight sub-block, found by a per-sub-block search
(`kompakt.ops.ggml_kquants_search`), then every weight rounded on its sub-block's grid.

`quantize_kquant(w, name)` runs the whole reference over all super-blocks at once (numpy,
float32 in the C order); `kompakt.ops.ggml_types.quantize` calls `quantize_kquant`.
`pack_kquant(header, L, name)` lays out bytes from a super-block header (the scale bytes of
`HEADER`) and the integer codes; GPTQ on these grids (`kompakt.ops.ggml_kquant_grid`) uses it
to write the codes it chose. The imatrix variants (`llama-quantize --imatrix`) are in
`kompakt.ops.ggml_kquants_weighted`.
"""

from __future__ import annotations

import numpy as np

from kompakt.ops.ggml_kquants_search import (
    F32,
    GROUP_MAX_EPS,
    make_q3_quants,
    make_qkx2_quants,
    make_qx_quants,
    nearest_int,
    seqmax,
    seqsum,
    signed_absmax,
)

QK_K = 256
KQUANT_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# Super-blocks per numpy pass: small enough that the working arrays stay in cache (2x faster
# than 4096 on a 576x1536 matrix) and memory stays bounded on embedding-sized tensors.
_CHUNK = 256


def quantize_kquant(w: np.ndarray, name: str) -> np.ndarray:
    """ggml's reference quantization of float32 `w` [rows, cols] (cols % 256 == 0) to K-quant
    `name`: uint8 [rows, row_bytes], the bytes llama-quantize writes without an imatrix."""
    w = np.ascontiguousarray(w, dtype=F32)
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{name} needs rows that are a multiple of {QK_K}, got {cols}")
    blocks = w.reshape(-1, QK_K)
    encode = _ENCODE[name]
    out = [encode(blocks[s : s + _CHUNK]) for s in range(0, len(blocks), _CHUNK)]
    return np.concatenate(out).reshape(rows, -1)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [nb] -> uint8 [nb, 2] as GGML_FP32_TO_FP16 stores it (round to nearest even)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def fp16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16).astype(F32)


def requantize(x, d, offset, lo, hi, fallback):
    """The reference's final pass: l = clamp(nearest_int((x + offset) / d)) where d != 0,
    else the search's own codes `fallback`. x [nb, n_sub, k], d/offset [nb, n_sub]."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shifted = x if offset is None else x + offset[..., None]
        l = np.clip(nearest_int(shifted / d[..., None]), lo, hi) - lo
    return np.where((d != 0)[..., None], l, fallback).astype(np.uint8)


# ------------------------------------------------------------------------ q4_K / q5_K


def _encode_q45(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> np.ndarray:
    nb = len(blocks)
    sub = blocks.reshape(nb * 8, 32)
    av_x = np.sqrt(seqsum(np.ascontiguousarray((sub * sub).T)) / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = seqmax(scales), seqmax(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    header = np.concatenate(
        [fp16_bytes(max_scale / F32(63)), fp16_bytes(max_min / F32(63)), pack_k4(ls, lm)],
        axis=1,
    )
    d, dmin = header_floats(header, "q4_k")
    L = requantize(
        blocks.reshape(nb, 8, 32), d[:, None] * ls, dmin[:, None] * lm, 0, nmax,
        L.reshape(nb, 8, 32),
    )
    return pack_kquant(header, L.reshape(nb, QK_K), "q5_k" if nmax == 31 else "q4_k")


def pack_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and 8 six-bit mins (q4_K / q5_K)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_k4 (ggml's get_scale_min_k4): uint8 [nb, 12] -> (scales, mins) [nb, 8]."""
    ls = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


# ------------------------------------------------------------------------------- q2_K


def _encode_q2(blocks: np.ndarray) -> np.ndarray:
    nb = len(blocks)
    sub = blocks.reshape(nb * 16, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = seqmax(scales), seqmax(mins)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = nearest_int((F32(15) / max_scale)[:, None] * scales)
        sc = np.where(max_scale[:, None] > 0, sc, 0)
        m = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed = ((sc & 0xFF) | ((m << 4) & 0xFF)).astype(np.uint8)
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    header = np.concatenate([packed, fp16_bytes(d), fp16_bytes(dmin)], axis=1)
    d, dmin = fp16(d), fp16(dmin)
    L = requantize(
        blocks.reshape(nb, 16, 16), d[:, None] * (packed & 0xF), dmin[:, None] * (packed >> 4),
        0, 3, L.reshape(nb, 16, 16),
    )
    return pack_kquant(header, L.reshape(nb, QK_K), "q2_k")


# ------------------------------------------------------------------------------- q3_K


def _encode_q3(blocks: np.ndarray) -> np.ndarray:
    nb = len(blocks)
    sub = blocks.reshape(nb * 16, 16)
    scales, L = make_q3_quants(sub, 4)
    scales = scales.reshape(nb, 16)
    max_scale = signed_absmax(scales)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-32) / max_scale
        l = (nearest_int(iscale[:, None] * scales) & 0xFF).astype(np.uint8).view(np.int8)
        l = (np.clip(l.astype(np.int32), -32, 31) + 32).astype(np.uint8)
        d = np.where(max_scale != 0, F32(1) / iscale, F32(0))
    l = np.where(max_scale[:, None] != 0, l, 0).astype(np.uint8)
    header = np.concatenate([pack_q3_scales(l), fp16_bytes(d)], axis=1)
    d = fp16(d)[:, None] * (l.astype(F32) - F32(32))
    L = requantize(blocks.reshape(nb, 16, 16), d, None, -4, 3, L.reshape(nb, 16, 16))
    return pack_kquant(header, L.reshape(nb, QK_K), "q3_k")


def pack_q3_scales(l: np.ndarray) -> np.ndarray:
    """16 six-bit q3_K scales (uint8 [nb, 16], 0..63) -> the 12 bytes of the block."""
    out = np.zeros((len(l), 12), dtype=np.uint8)
    out[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    high = (l >> 4).reshape(-1, 4, 4)  # [nb, j // 4, j % 4]
    out[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def unpack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Inverse of pack_q3_scales: uint8 [nb, 12] -> six-bit scales [nb, 16] (0..63)."""
    low = np.concatenate([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], axis=1)
    high = np.concatenate([(sc[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=1)
    return low | (high << 4)


# ------------------------------------------------------------------------------- q6_K


def encode_q6(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """q6_K super-blocks; `qw` the importance weights of the imatrix variant (same layout)."""
    nb = len(blocks)
    sub = blocks.reshape(nb * 16, 16)
    scales, L = make_qx_quants(sub, 32, None if qw is None else qw.reshape(-1, 16))
    scales = scales.reshape(nb, 16)
    max_scale = signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d = np.where(zero, F32(0), F32(1) / iscale)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)) & 0xFF
    sc = np.where(zero[:, None], 0, sc).astype(np.uint8)
    header = np.concatenate([sc, fp16_bytes(d)], axis=1)
    dd = fp16(d)[:, None] * sc.view(np.int8).astype(F32)
    L = requantize(blocks.reshape(nb, 16, 16), dd, None, -32, 31, L.reshape(nb, 16, 16))
    L = np.where(zero[:, None, None], 0, L)
    out = pack_kquant(header, L.reshape(nb, QK_K), "q6_k")
    out[zero] = 0
    return out


# --------------------------------------------------------------------------- layouts

# Bytes of the super-block header (scales, mins, fp16 d / dmin) in each type's own order.
HEADER = {"q2_k": 20, "q3_k": 14, "q4_k": 16, "q5_k": 16, "q6_k": 18}


def header_floats(header: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(d, dmin or None) as float32 [nb] from a header (HEADER[name] bytes per super-block)."""
    at = {"q2_k": 16, "q3_k": 12, "q4_k": 0, "q5_k": 0, "q6_k": 16}[name]
    d = np.ascontiguousarray(header[:, at : at + 2]).view(np.float16)[:, 0].astype(F32)
    if name in ("q3_k", "q6_k"):
        return d, None
    dmin = np.ascontiguousarray(header[:, at + 2 : at + 4]).view(np.float16)[:, 0].astype(F32)
    return d, dmin


def pack_kquant(header: np.ndarray, L: np.ndarray, name: str) -> np.ndarray:
    """Block bytes from a header uint8 [nb, HEADER[name]] and codes L [nb, 256] (unsigned:
    0..2^bits-1, the signed types' offset included) -> uint8 [nb, block_bytes]."""
    L = L.astype(np.uint8)
    nb = len(L)
    if name in ("q2_k", "q3_k"):
        hmask = None
        if name == "q3_k":
            hi = (L >> 2).reshape(nb, 8, 32)  # bit j // 32 of hmask[j % 32]
            hmask = sum((hi[:, b] & 1) << b for b in range(8)).astype(np.uint8)
        q = (L & 3).reshape(nb, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        qs = qs.reshape(nb, 64)
        if name == "q2_k":
            return np.concatenate([header[:, :16], qs, header[:, 16:]], axis=1)
        return np.concatenate([hmask, qs, header], axis=1)
    if name in ("q4_k", "q5_k"):
        q = (L & 0xF).reshape(nb, 4, 2, 32)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
        if name == "q4_k":
            return np.concatenate([header, qs], axis=1)
        hi = (L >> 4).reshape(nb, 4, 2, 32)
        qh = sum((hi[:, c, h] & 1) << (2 * c + h) for c in range(4) for h in range(2))
        return np.concatenate([header, qh.astype(np.uint8), qs], axis=1)
    q = L.reshape(nb, 2, 4, 32)
    low, hi = q & 0xF, q >> 4
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), header], axis=1)


_ENCODE = {
    "q2_k": _encode_q2,
    "q3_k": _encode_q3,
    "q4_k": lambda b: _encode_q45(b, 15, -1.0, 20),
    "q5_k": lambda b: _encode_q45(b, 31, -0.5, 15),
    "q6_k": encode_q6,
}
