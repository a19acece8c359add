"""llama.cpp's importance-weighted encoders of the 32-weight block types, byte-identical.

With an importance matrix (llama-imatrix: the mean squared activation of every input column),
`llama-quantize --imatrix` no longer rounds each block to the nearest grid point with the
reference scale: it searches the block scale (and minimum) that minimise the error weighted
by imp[j] · sqrt(σ² + x[j]²) (σ² = the row's mean square; ggml-quants.c `quantize_row_q4_0_impl`
etc.):

- q4_0 / q5_0: `make_qx_quants` — 19 scales around max / -8 (-16), the least-squares scale of
  the best one's codes.
- q4_1 / q5_1: `make_qkx3_quants` — 37 ranges from (max - min)/(15 - 0.9) to /(15 + 0.9) (31
  for q5_1), each with the weighted least-squares scale and minimum of its codes (minimum
  capped at 0), the one with the smallest weighted squared error: the K-quants' search
  (kompakt.ops.ggml_kquants_search.make_qkx2_quants) on 32 weights.
- iq4_nl: its own scale search with these weights (kompakt.ops.ggml_iq4nl).
- q8_0 ignores the importance (as ggml does).

`quantize_weighted(w, name, importance)` returns the file bytes; tests/ops/test_ggml_blocks32.py
checks them against `ggml_quantize_chunk` with the same imatrix. Byte identity needs ggml's
float32 arithmetic in its order: products left to right, sums accumulated sequentially,
`nearest_int` = round half to even.
"""

from __future__ import annotations

import numpy as np

from kompakt.ops import ggml_iq4nl, ggml_types
from kompakt.ops.ggml_kquants_search import make_qkx2_quants, seqsum

BLOCK = 32
_NMAX_SYMMETRIC = {"q4_0": 8, "q5_0": 16}
_NMAX_ASYMMETRIC = {"q4_1": 15, "q5_1": 31}
_GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32


def _make_qx_quants(x: np.ndarray, weight: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale [B], codes L [B, 32] in 0..2·nmax-1) of ggml's make_qx_quants(rmse_type=1, qw)."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    live = np.abs(peak) >= _GROUP_MAX_EPS
    peak = np.where(live, peak, F32(1))

    def codes(iscale: np.ndarray) -> np.ndarray:  # signed l in [-nmax, nmax-1], as float32
        return np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)

    def sums(l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return seqsum(weight * x * l, axis=-1), seqsum(weight * l * l, axis=-1)

    iscale = F32(-nmax) / peak
    l_best = codes(iscale)
    sumlx, suml2 = sums(l_best)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            l = codes(iscale)
            sumlx, suml2 = sums(l)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            l_best = np.where(better[:, None], l, l_best)
            scale = np.where(better, sumlx / suml2, scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    stored = (l_best + nmax).astype(np.uint8)
    return np.where(live, scale, F32(0)), np.where(live[:, None], stored, np.uint8(0))


def _block_weights(w: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """imp · sqrt(σ²_row + x²), [rows, cols] -> [rows · cols/32, 32]."""
    sigma2 = seqsum(w * w, axis=-1) / F32(w.shape[1])
    return (importance[None, :] * np.sqrt(sigma2[:, None] + w * w)).reshape(-1, BLOCK)


def _pack(fmt: str, d: np.ndarray, m: np.ndarray | None, codes: np.ndarray, rows: int) -> np.ndarray:
    parts = [d.astype(np.float16).reshape(-1, 1).view(np.uint8)]
    if m is not None:
        parts.append(m.astype(np.float16).reshape(-1, 1).view(np.uint8))
    if fmt in ("q5_0", "q5_1"):
        parts.append(np.packbits(codes >> np.uint8(4), axis=-1, bitorder="little"))
        codes = codes & np.uint8(0x0F)
    parts.append(codes[:, : BLOCK // 2] | (codes[:, BLOCK // 2 :] << np.uint8(4)))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def quantize_weighted(w: np.ndarray, name: str, importance: np.ndarray) -> np.ndarray:
    """What `llama-quantize --imatrix` writes for float32 w [rows, cols] as type `name`, given
    the imatrix entry `importance` [cols] of this tensor; uint8 [rows, row_bytes]."""
    t = ggml_types.ggml_type(name)
    w = np.ascontiguousarray(w, dtype=F32)
    importance = np.asarray(importance, dtype=F32)
    if w.ndim != 2 or importance.shape != (w.shape[1],):
        raise ValueError(f"expected w [rows, cols] and importance [cols], got {w.shape} and {importance.shape}")
    if t.name == "iq4_nl":
        return ggml_iq4nl.quantize(w, importance)
    if t.name not in _NMAX_SYMMETRIC and t.name not in _NMAX_ASYMMETRIC:
        if t.name in ("q8_0", "f32", "f16", "bf16"):  # ggml ignores the importance for these
            return ggml_types.quantize(w, t.name)
        raise ValueError(f"no importance-weighted 32-block encoder for {t.name}")
    if not t.fits(w.shape[1]):
        raise ValueError(f"{t.name} needs rows that are a multiple of {BLOCK}, got {w.shape[1]}")
    x, weight = w.reshape(-1, BLOCK), _block_weights(w, importance)
    if t.name in _NMAX_SYMMETRIC:
        d, codes = _make_qx_quants(x, weight, _NMAX_SYMMETRIC[t.name])
        return _pack(t.name, d, None, codes, w.shape[0])
    # ggml's make_qkx3_quants(-0.9, 0.05, 36): the K-quants' weighted scale + min search on 32 weights
    d, negated_min, codes = make_qkx2_quants(x, weight, _NMAX_ASYMMETRIC[t.name], -0.9, 0.05, 36, use_mad=False)
    return _pack(t.name, d, -negated_min, codes, w.shape[0])
