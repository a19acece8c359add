"""llama.cpp's IQ4_NL encoder in numpy, byte-identical to ggml's `quantize_iq4_nl`.

IQ4_NL (Kawrakow, llama.cpp PR #5590) stores a block of 32 weights as an fp16 scale d and 32
4-bit indices into a fixed non-linear table (KVALUES, denser near zero, where most weights
are): x ≈ d · KVALUES[i]. Same 4.5 bits per weight as q4_0, usually lower error, and every
llama.cpp backend runs it; gguf-py reads it but cannot write it, hence this module.

The encoder (ggml-quants.c `quantize_row_iq4_nl_impl`, super-block = block = 32, ntry = 7, the
path `ggml_quantize_chunk` and `llama-quantize` take) per block:
1. weights: x² (no importance matrix) or imatrix · sqrt(σ² + x²) with σ² = 2/32 · Σx².
2. start from d = max/127 (max = the signed weight of largest magnitude), pick the nearest
   table entry for each x/d and the least-squares d = Σwqx / Σwq² for those indices;
3. try 15 more scales, id = (t − 127)/max for t = −7..7, keeping the one with the largest
   (Σwqx)²/Σwq²;
4. store fp16(d) and the nearest indices of x/d (with the unrounded d).

Byte identity needs ggml's fp32 arithmetic in its order: products elementwise in float32 and
sums accumulated sequentially over the 32 weights (numpy's pairwise `sum` would differ), the
nearest-index rule of `best_index_int8` (ties go up). Vectorized over blocks, so a 50M-weight
embedding takes seconds. tests/ops/test_ggml_blocks32.py checks it against libggml.
"""

from __future__ import annotations

import numpy as np

from kompakt.ops.ggml_kquants_search import seqsum


BLOCK = 32
BLOCK_BYTES = 18  # fp16 d + 16 bytes of index pairs
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
NTRY = 7
_GROUP_MAX_EPS = np.float32(1e-15)
_ROWS_PER_CHUNK = 256  # [blocks, 32] temporaries of a few MB: cache-sized, fastest


def nearest_index(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over KVALUES: the nearest entry, ties to the upper one; uint8."""
    x = np.asarray(x, dtype=np.float32)
    upper = np.ones(x.shape, dtype=np.uint8)  # the first entry above x, clamped to 1..15
    for value in KVALUES[1:-1]:  # counting beats searchsorted and fancy indexing by 5x here
        np.add(upper, x >= value, out=upper, casting="unsafe")
    below, above = KVALUES.take(upper - 1), KVALUES.take(upper)
    index = upper - (x - below < above - x).astype(np.uint8)
    return np.where(x <= KVALUES[0], np.uint8(0), np.where(x >= KVALUES[-1], np.uint8(len(KVALUES) - 1), index))


def _fit(x: np.ndarray, weight: np.ndarray, id_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σwqx, Σwq²) [B] for the indices nearest to id·x; x, weight [B, 32], id [B]."""
    q = KVALUES.take(nearest_index(id_[:, None] * x))
    wq = weight * q
    return seqsum(wq * x, axis=-1), seqsum(wq * q, axis=-1)


def block_scales(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """The unrounded float32 scale d [B] ggml chooses for each block of x [B, 32].

    `importance` [B, 32] is the imatrix slice of each block (None = llama.cpp without one).
    Blocks whose largest |x| is below 1e-15 get d = 0.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if importance is None:
        weight = x * x
    else:
        sigma2 = seqsum(x * x, axis=-1) * np.float32(2.0 / BLOCK)
        weight = np.asarray(importance, dtype=np.float32) * np.sqrt(sigma2[:, None] + x * x)
    arg = np.abs(x).argmax(axis=-1)  # first of equal magnitudes, as ggml's strict `>`
    peak = np.take_along_axis(x, arg[:, None], axis=-1)[:, 0]  # signed
    live = np.abs(peak) >= _GROUP_MAX_EPS
    peak = np.where(live, peak, np.float32(1))  # dead blocks: any finite value, reset below
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -peak / KVALUES[0]
        sumqx, sumq2 = _fit(x, weight, np.float32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0)).astype(np.float32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            id_ = (np.float32(itry) + KVALUES[0]) / peak
            sumqx, sumq2 = _fit(x, weight, id_)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            new_d = np.where(better, sumqx / sumq2, d).astype(np.float32)
            best = np.where(better, new_d * sumqx, best).astype(np.float32)
            d = new_d
    return np.where(live, d, np.float32(0)).astype(np.float32)


def encode_blocks(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices uint8 [B, 32], fp16 d [B]) of blocks x [B, 32], exactly as ggml stores them."""
    d = block_scales(x, importance)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return nearest_index(inv[:, None] * np.asarray(x, dtype=np.float32)), d.astype(np.float16)


def pack(indices: np.ndarray, d: np.ndarray) -> np.ndarray:
    """IQ4_NL block bytes [B, 18]: fp16 d, then index j in the low and j + 16 in the high nibble."""
    low, high = indices[:, : BLOCK // 2], indices[:, BLOCK // 2 :]
    nibbles = (low | (high << np.uint8(4))).astype(np.uint8)
    return np.concatenate([np.asarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8), nibbles], axis=-1)


def quantize(w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """IQ4_NL bytes uint8 [rows, cols/32 · 18] of a float32 [rows, cols] weight.

    `importance` [cols]: llama.cpp's imatrix entry of this tensor (mean squared activation per
    input column), None for plain rounding.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"iq4_nl needs rows that are a multiple of {BLOCK}, got {cols}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance must have one value per input column ({cols}), got {importance.shape}")
    out = np.empty((rows, cols // BLOCK * BLOCK_BYTES), dtype=np.uint8)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = w[start : start + _ROWS_PER_CHUNK]
        blocks = chunk.reshape(-1, BLOCK)  # [chunk rows · cols/32, 32]
        imp = None
        if importance is not None:  # the same column weights for every row: [chunk rows · cols/32, 32]
            imp = np.tile(importance.reshape(-1, BLOCK), (len(chunk), 1))
        indices, d = encode_blocks(blocks, imp)
        out[start : start + len(chunk)] = pack(indices, d).reshape(len(chunk), -1)
    return out

