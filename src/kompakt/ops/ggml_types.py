"""The GGUF tensor types kompakt writes, one table, and the reference quantizer of each.

Every quantized type stores a row as blocks of `block` consecutive weights (along the input
dimension) in `block_bytes` bytes; a row must be a multiple of `block` long (the K-quants'
super-blocks are 256, so SmolLM2's 576-wide rows cannot take them, its 1536-wide down_proj can).
Sizes come from gguf-py's GGML_QUANT_SIZES, which is llama.cpp's own table.

`quantize(w, name)` is llama.cpp's reference quantizer (what `llama-quantize` writes for that
type with plain rounding; kompakt.ops.ggml_imatrix writes what `llama-quantize --imatrix`
writes), byte for byte: llama.cpp's own C function when llama-cpp-python is installed
(kompakt.ops.ggml_native), else `numpy_quantize`; `dequantize` is the inverse llama.cpp
computes when it runs the file. In `numpy_quantize`, types gguf-py can encode go through
gguf-py; the others have kompakt's own encoders (see _own_encoder), tested byte-identical against ggml's `ggml_quantize_chunk` in
tests/ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

FLOAT_TYPES = ("f32", "f16", "bf16")
# Largest first: the order the allocation and the CLI list them in.
QUANT_TYPES = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "iq4_nl", "q4_0", "q3_k", "q2_k")
NAMES = FLOAT_TYPES + QUANT_TYPES
# Types whose blocks store a minimum beside the scale (x = q*d - m), the others are symmetric.
ASYMMETRIC = ("q5_1", "q4_1", "q5_k", "q4_k", "q2_k")
# Types gguf-py (gguf.quants.quantize) encodes bit-exactly like ggml's reference quantizer.
_GGUF_PY_ENCODES = ("bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclass(frozen=True)
class GgmlType:
    """One GGUF tensor type: how many weights a block holds and how many bytes it takes."""

    name: str
    block: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_TYPES

    def fits(self, cols: int) -> bool:
        """Whether a row of `cols` weights can be stored in this type."""
        return cols % self.block == 0

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.block_bytes

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return rows * self.row_bytes(int(shape[-1]))


def ggml_type(name: str) -> GgmlType:
    """The GgmlType called `name` (case-insensitive); ValueError naming the choices otherwise."""
    import gguf

    key = name.lower()
    if key not in NAMES:
        raise ValueError(f"unknown GGUF tensor type {name!r}; choose one of {', '.join(NAMES)}")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[key.upper()]]
    return GgmlType(key, block, size)


def gguf_enum(name: str):
    """gguf.GGMLQuantizationType of `name` (imported lazily: only writers need gguf)."""
    import gguf

    return gguf.GGMLQuantizationType[ggml_type(name).name.upper()]


def quantize(w: np.ndarray, name: str, threads: int | None = None) -> np.ndarray:
    """llama.cpp's reference quantization of a float32 [rows, cols] array, as file bytes.

    Returns uint8 [rows, row_bytes] for quantized types (float16 / float32 arrays for f16 / f32).
    With llama-cpp-python installed, llama.cpp's own C quantizer writes them (kompakt.ops.
    ggml_native: same bytes, on `threads` threads, default torch's); otherwise `numpy_quantize`.
    With an imatrix entry, kompakt.ops.ggml_imatrix.quantize writes `llama-quantize --imatrix`'s.
    """
    from kompakt.ops import ggml_native

    t = ggml_type(name)
    if t.name not in ("f32", "f16") and ggml_native.available():
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2 or not t.fits(w.shape[1]):
            return numpy_quantize(w, name)  # its one-line errors
        return ggml_native.quantize(w, int(gguf_enum(t.name)), t.row_bytes(w.shape[1]), threads)
    return numpy_quantize(w, name)


def numpy_quantize(w: np.ndarray, name: str) -> np.ndarray:
    """`quantize` without llama.cpp's library: gguf-py's encoders and kompakt's own, the same bytes."""
    t = ggml_type(name)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if t.name == "f32":
        return w
    if t.name == "f16":
        return w.astype(np.float16)
    if not t.fits(w.shape[1]):
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block}, got {w.shape[1]}")
    if t.name in _GGUF_PY_ENCODES:
        import gguf

        return gguf.quants.quantize(w, gguf_enum(t.name))
    return _own_encoder(t.name)(w)


def dequantize(data: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 [rows, cols] that llama.cpp computes from the bytes `quantize` wrote."""
    t = ggml_type(name)
    if t.name in ("f32", "f16"):
        return np.asarray(data, dtype=np.float32).reshape(shape)
    import gguf

    return gguf.quants.dequantize(np.asarray(data, dtype=np.uint8), gguf_enum(t.name)).reshape(shape)


def fake_quantize(w: np.ndarray, name: str) -> np.ndarray:
    """The weights llama.cpp will compute with after reference quantization to `name`."""
    return dequantize(quantize(w, name), name, w.shape)


def _own_encoder(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """kompakt's encoder of a type gguf-py cannot write: w float32 [rows, cols] -> uint8 [rows,
    row_bytes] (imported lazily: numpy-heavy, and only writers need it)."""
    if name == "iq4_nl":
        from kompakt.ops.ggml_iq4nl import quantize as quantize_iq4nl

        return quantize_iq4nl
    from kompakt.ops.ggml_kquants import quantize_kquant

    return lambda w: quantize_kquant(w, name)
