"""`llama-quantize --imatrix`'s bytes: a tensor quantized with its importance-matrix entry.

With an entry (the mean squared activation of each input column), ggml no longer rounds each
block to the nearest grid point: it searches the block's scale (and minimum) for the least
importance-weighted error. llama.cpp's own `ggml_quantize_chunk` does it when llama-cpp-python is
installed (kompakt.ops.ggml_native, the importance row passed along); otherwise kompakt's numpy
encoders write the same bytes (kompakt.ops.ggml_weighted32 for the 32-weight block types,
kompakt.ops.ggml_kquants_weighted for the K-quants; tested against the library in tests/ops).
"""

from __future__ import annotations

import numpy as np

from kompakt.ops import ggml_native, ggml_types

# Types ggml quantizes the same with or without an importance matrix.
IGNORED = (*ggml_types.FLOAT_TYPES, "q8_0")


def quantize(w: np.ndarray, name: str, importance: np.ndarray | None, threads: int | None = None) -> np.ndarray:
    """uint8 [rows, row_bytes] of float32 `w` [rows, cols] as type `name`, rounded with
    `importance` [cols] (None: ggml_types.quantize, plain rounding)."""
    t = ggml_types.ggml_type(name)
    if importance is None or t.name in IGNORED:
        return ggml_types.quantize(w, name, threads)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or np.shape(importance) != (w.shape[1],):
        raise ValueError(f"expected w [rows, cols] and importance [cols], got {w.shape} and {np.shape(importance)}")
    if ggml_native.available() and t.fits(w.shape[1]):
        return ggml_native.quantize(w, int(ggml_types.gguf_enum(t.name)), t.row_bytes(w.shape[1]), threads, importance)
    if t.name.endswith("_k"):
        from kompakt.ops.ggml_kquants_weighted import quantize_weighted
    else:
        from kompakt.ops.ggml_weighted32 import quantize_weighted
    return quantize_weighted(w, t.name, importance)
