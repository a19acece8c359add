"""llama.cpp's own quantizer (`ggml_quantize_chunk` in libggml-base), called through ctypes.

When llama-cpp-python is installed (the `llamacpp` extra) its bundled libggml-base exports the
function `llama-quantize` itself runs, so GGUF export can write llama.cpp's bytes at C speed
instead of numpy's: on a 4-layer Llama-2-7B-shaped model the q6_K output tensor alone took
11 s of a 22 s export in numpy. The call releases the GIL, so row chunks run on several threads.
Without the library the numpy encoders (kompakt.ops.ggml_types) write the same bytes (tested).

Library vs ours: the quantization is llama.cpp's; ours is finding the library, the ctypes
signature and the split into row chunks.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CHUNK_VALUES = 1 << 20  # values per call: enough to amortise the call, small enough to share work


@cache
def _quantize_chunk():
    """ggml_quantize_chunk of llama-cpp-python's libggml-base, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    for path in sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*")):
        try:
            function = ctypes.CDLL(str(path)).ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_size_t
        function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
        return function
    logger.debug("llama-cpp-python has no loadable libggml-base; GGUF quantization stays in numpy")
    return None


def available() -> bool:
    return _quantize_chunk() is not None


def quantize(w: np.ndarray, ggml_type: int, row_bytes: int, threads: int | None = None,
             importance: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """uint8 [rows, row_bytes]: llama.cpp's quantization of float32 `w` [rows, cols] to `ggml_type`
    (gguf.GGMLQuantizationType's value), row chunks on `threads` threads (default torch's); with `importance` [cols]
    (an imatrix row) what `llama-quantize --imatrix` writes."""
    function = _quantize_chunk()
    if function is None:
        raise RuntimeError("llama.cpp's quantizer is not available (install llama-cpp-python)")
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    step = max(1, CHUNK_VALUES // max(cols, 1))

    def run(start: int) -> None:
        count = min(step, rows - start)
        # start is an element offset into src and dst alike (ggml advances dst by start's rows)
        function(ggml_type, w.ctypes.data, out.ctypes.data, start * cols, count, cols,
                 None if imatrix is None else imatrix.ctypes.data)  # fmt: skip

    starts = range(0, rows, step)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))
    else:
        for start in starts:
            run(start)
    return out
