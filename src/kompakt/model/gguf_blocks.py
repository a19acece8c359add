"""Exact GGUF tensor bytes a quant pass chose, carried from the pass to the GGUF export.

Some grids cannot be recovered from the dense weights they leave: a K-quant's sub-block scales
and minima (or an iq4_nl block's scale) are not determined by the dequantized values, so a
re-quantization at export would round differently from what GPTQ optimised. A pass that puts a
weight on such a grid hands over the file bytes instead:

    loaded.gguf_blocks["model.layers.0.mlp.down_proj"] = GgufBlocks("q4_k", data)  # uint8 [rows, row_bytes]

They live on the in-memory model (`LoadedModel.gguf_blocks`), are saved with a run's step as
`gguf_blocks.safetensors` next to the weights (uint8 tensors keyed by module name, the type of
each in the file's metadata; no pickle) and read back by `kompakt.load`. The GGUF export writes
them only while `dequantize(bytes)` still equals the weights exactly (rows in HF order; the
exporter permutes q/k rows itself), and re-quantizes otherwise (a later pass changed the
weights); `clear_quantization` drops them when a pass moves the weights off the grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompakt.errors import ModelFormatError
from kompakt.ops.ggml_types import QUANT_TYPES, dequantize, ggml_type

BLOCKS_FILE = "gguf_blocks.safetensors"
_TYPES_KEY = "kompakt_gguf_block_types"  # safetensors metadata: JSON {module: type}


@dataclass(frozen=True)
class GgufBlocks:
    """One weight's GGUF bytes: `type` (a quantized kompakt.ops.ggml_types name), `data` uint8 [rows, row_bytes]."""

    type: str
    data: np.ndarray

    def shape(self) -> tuple[int, int]:
        """The weight shape [rows, cols] these bytes encode."""
        t = ggml_type(self.type)
        return int(self.data.shape[0]), int(self.data.shape[1]) // t.block_bytes * t.block

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols]: the values llama.cpp computes with."""
        return dequantize(self.data, self.type, self.shape())

    def matches(self, weight: np.ndarray) -> bool:
        """Whether these bytes encode exactly `weight` (float32 [rows, cols])."""
        return tuple(weight.shape) == self.shape() and np.array_equal(self.dequantize(), weight)


def save_blocks(blocks: Mapping[str, GgufBlocks], directory: str | Path) -> Path | None:
    """Write `blocks` to `<directory>/gguf_blocks.safetensors` atomically; None when there are none."""
    if not blocks:
        return None
    from safetensors.numpy import save_file

    from kompakt.atomic import atomic_file

    target = Path(directory) / BLOCKS_FILE
    tensors = {name: np.ascontiguousarray(b.data, dtype=np.uint8) for name, b in blocks.items()}
    metadata = {_TYPES_KEY: json.dumps({name: b.type for name, b in blocks.items()}, sort_keys=True)}
    with atomic_file(target, expected_bytes=sum(t.nbytes for t in tensors.values())) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return target


def load_blocks(directory: str | Path, *, mmap: bool = False) -> dict[str, GgufBlocks]:
    """The blocks saved in `directory` ({} when it has none). `mmap`: the arrays are read-only
    views of the file (numpy memmaps), read when a tensor is written: the streaming GGUF export
    (kompakt.export.gguf_stream) never holds them all (a 7B model's K-quant bytes are ~4 GB).

    Raises:
        ModelFormatError: the file is unreadable, or names a type or shape no GGUF tensor has.
    """
    path = Path(directory) / BLOCKS_FILE
    if not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(f"{path} is corrupt ({why}); delete it to re-quantize those tensors at export")

    try:
        with safe_open(str(path), framework="numpy") as handle:
            types = json.loads((handle.metadata() or {}).get(_TYPES_KEY, "{}"))
            arrays = _mapped(path, list(handle.keys())) if mmap else {n: handle.get_tensor(n) for n in handle.keys()}
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise bad(type(exc).__name__) from None
    if not isinstance(types, dict) or set(types) != set(arrays):
        raise bad("its tensors and their types disagree")
    result = {}
    for name, data in arrays.items():
        kind = str(types[name]).lower()
        if kind not in QUANT_TYPES or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % ggml_type(kind).block_bytes:
            raise bad(f"{name}: {kind} bytes of shape {tuple(data.shape)}")
        result[name] = GgufBlocks(kind, data)
    return result


def _mapped(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Memory-mapped uint8 views of `names` in a safetensors file (header: 8-byte length, JSON
    with dtype, shape and data_offsets; the data follows). ValueError for another dtype."""
    import struct

    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    arrays = {}
    for name in names:
        entry = header[name]
        if entry["dtype"] != "U8":
            raise ValueError(f"{name} is {entry['dtype']}, not U8")
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        arrays[name] = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length + begin, shape=shape) if end > begin \
            else np.zeros(shape, dtype=np.uint8)
    return arrays
