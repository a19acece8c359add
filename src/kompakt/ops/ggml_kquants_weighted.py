"""llama.cpp's K-quant encoders with an importance matrix, byte-identical to ggml.

What `llama-quantize --imatrix` writes: ggml's `quantize_row_q{2..6}_K_impl` with
`quant_weights` (one importance per input column, the mean squared activation llama-imatrix
collects). Every weight's error counts in proportion to importance·sqrt(σ² + x²) in the
sub-block searches (make_qkx3_quants, make_qx_quants), and the super-block scales themselves
are fitted with the sub-blocks' total importance (make_qp_quants / make_qx_quants) instead of
scaling the largest one to the top code. q6_K weighs by the raw importance.
"""

from __future__ import annotations

import numpy as np

from kompakt.ops.ggml_kquants import (
    F32,
    QK_K,
    encode_q6,
    fp16,
    fp16_bytes,
    pack_k4,
    pack_kquant,
    pack_q3_scales,
    requantize,
    unpack_k4,
)
from kompakt.ops.ggml_kquants_search import (
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    seqsum,
)

_CHUNK = 256  # super-blocks per numpy pass, as in ggml_kquants


def quantize_weighted(w: np.ndarray, name: str, importance: np.ndarray) -> np.ndarray:
    """ggml's imatrix quantization of float32 `w` [rows, cols] to K-quant `name` with
    `importance` [cols] (≥ 0): uint8 [rows, row_bytes], llama-quantize --imatrix's bytes."""
    w = np.ascontiguousarray(w, dtype=F32)
    rows, cols = w.shape
    importance = np.asarray(importance, dtype=F32).reshape(-1)
    if cols % QK_K:
        raise ValueError(f"{name} needs rows that are a multiple of {QK_K}, got {cols}")
    if importance.shape != (cols,):
        raise ValueError(f"importance has {importance.size} values for rows of {cols}")
    blocks = w.reshape(-1, QK_K)
    qw = np.broadcast_to(importance.reshape(1, -1, QK_K), (rows, cols // QK_K, QK_K))
    qw = qw.reshape(-1, QK_K)  # [nb, 256], the importance of each super-block's columns
    encode = _ENCODE[name]
    out = [
        encode(blocks[s : s + _CHUNK], qw[s : s + _CHUNK])
        for s in range(0, len(blocks), _CHUNK)
    ]
    return np.concatenate(out).reshape(rows, -1)


def _sigma2(blocks: np.ndarray, factor: float) -> np.ndarray:
    """factor·Σx²/256 per super-block [nb, 1] (sequential float32 sum, as the C loop)."""
    total = seqsum(np.ascontiguousarray((blocks * blocks).T))
    return (F32(factor) * total / F32(QK_K))[:, None]


def _weights(blocks, qw, sigma2, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-weight search weights qw·sqrt(σ² + x²) [nb·n_sub, sub], their sums [nb, n_sub])."""
    nb = len(blocks)
    weights = (qw * np.sqrt(sigma2 + blocks * blocks)).reshape(-1, sub)
    sums = seqsum(np.ascontiguousarray(weights.T)).reshape(nb, -1)
    return weights, sums


def _encode_q2(blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = len(blocks)
    weights, sw = _weights(blocks, qw, _sigma2(blocks, 1.0), 16)
    sub = blocks.reshape(-1, 16)
    scales, mins, L = make_qkx2_quants(sub, weights, 3, -0.9, 0.05, 36, False)
    dm, ls = make_qp_quants(scales.reshape(nb, 16), 15, sw)
    mm, lm = make_qp_quants(mins.reshape(nb, 16), 15, sw)
    packed = (ls | (lm << 4)).astype(np.uint8)
    header = np.concatenate([packed, fp16_bytes(dm), fp16_bytes(mm)], axis=1)
    d, dmin = fp16(dm), fp16(mm)
    L = requantize(
        blocks.reshape(nb, 16, 16), d[:, None] * (packed & 0xF), dmin[:, None] * (packed >> 4),
        0, 3, L.reshape(nb, 16, 16),
    )  # fmt: skip
    return pack_kquant(header, L.reshape(nb, QK_K), "q2_k")


def _encode_q3(blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = len(blocks)
    weights, sw = _weights(blocks, qw, _sigma2(blocks, 2.0), 16)
    scales, L = make_qx_quants(blocks.reshape(-1, 16), 4, weights)
    d_block, ls = make_qx_quants(scales.reshape(nb, 16), 32, sw)  # ls = l + 32, 0..63
    header = np.concatenate([pack_q3_scales(ls), fp16_bytes(d_block)], axis=1)
    d = fp16(d_block)[:, None] * (ls.astype(F32) - F32(32))
    L = requantize(blocks.reshape(nb, 16, 16), d, None, -4, 3, L.reshape(nb, 16, 16))
    return pack_kquant(header, L.reshape(nb, QK_K), "q3_k")


def _encode_q45(blocks: np.ndarray, qw: np.ndarray, nmax: int) -> np.ndarray:
    nb = len(blocks)
    weights, sw = _weights(blocks, qw, _sigma2(blocks, 2.0), 32)
    sub = blocks.reshape(-1, 32)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, -0.9, 0.05, 36, False)
    d_block, ls = make_qp_quants(scales.reshape(nb, 8), 63, sw)
    m_block, lm = make_qp_quants(mins.reshape(nb, 8), 63, sw)
    if nmax == 31:  # q5_K clamps the six-bit scales; q4_K packs them as they come
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    header = np.concatenate([fp16_bytes(d_block), fp16_bytes(m_block), pack_k4(ls, lm)], axis=1)
    d, dmin = fp16(d_block), fp16(m_block)
    sc, m = (v.astype(F32) for v in unpack_k4(header[:, 4:16]))  # get_scale_min_k4
    L = requantize(
        blocks.reshape(nb, 8, 32), d[:, None] * sc, dmin[:, None] * m, 0, nmax,
        L.reshape(nb, 8, 32),
    )  # fmt: skip
    return pack_kquant(header, L.reshape(nb, QK_K), "q5_k" if nmax == 31 else "q4_k")


_ENCODE = {
    "q2_k": _encode_q2,
    "q3_k": _encode_q3,
    "q4_k": lambda b, qw: _encode_q45(b, qw, 15),
    "q5_k": lambda b, qw: _encode_q45(b, qw, 31),
    "q6_k": encode_q6,
}
