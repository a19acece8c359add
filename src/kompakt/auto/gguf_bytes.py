"""The bytes of the GGUF file export would write, without writing it: what the planner's size
factors are made of.

Tensor types, shapes and names come from the export's own plan (kompakt.export.gguf:
prepare_gguf / plan_tensors), so the per-tensor decisions (the tied embedding kept at Q8_0 as
the output tensor, F16 for rows that are not a multiple of 32, F32 norms) are the export's.
The file also holds a header: the tokenizer (Gemma 3's 262k tokens and merges are 15.8 MB,
5 % of its Q8_0 file; counting only tensors, the plan once said 1.88x where the file was
1.78x), hyperparameters and one entry per tensor; it is serialised here by gguf-py's writer
with the export's own header function (kompakt.export.gguf.add_header), into a temporary file
that is measured and deleted. Tensor data is aligned as the writer aligns it.

Exact to the byte for the model it is computed on; the model's public name (a general key) can
differ by a few bytes between a run's step and its `export/hf` copy.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")


@dataclass
class GGUFBytes:
    """One export type's file, by part (bytes)."""

    total: int
    other: int  # header (tokenizer, hyperparameters, tensor infos, alignment) + tensors outside these
    embedding: int  # token_embd (the output too, when tied) and a separate output.weight
    layers: int  # the decoder layers' tensors (blk.*)
    embedding_type: str  # the type export writes token_embd in
    embedding_elements: int  # weights in the embedding tensors

    def to_dict(self) -> dict:
        return asdict(self)

    def embedding_as(self, ttype: str) -> int:
        """Bytes of the embedding tensors if they were stored as `ttype`."""
        return tensor_bytes((self.embedding_elements,), ttype)


def tensor_bytes(shape: tuple[int, ...], ttype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ttype.upper()]]
    return math.prod(shape) // block * size


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _header_bytes(loaded: LoadedModel, family, config, vocab, plan) -> tuple[int, int]:
    """(bytes before the tensor data, alignment) of the file export writes for `plan`."""
    import gguf
    import numpy as np

    from kompakt.export.gguf import add_header

    with tempfile.TemporaryDirectory(prefix="kompakt-gguf-size-") as tmp:
        path = Path(tmp) / "header.gguf"
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)])
        add_header(writer, loaded, plan, config, family, vocab)
        for item in plan.tensors:
            raw = gguf.GGMLQuantizationType[item.type.upper()]
            writer.add_tensor_info(item.gguf_name, item.shape, np.dtype(np.float32),
                                   tensor_bytes(item.shape, item.type), raw_dtype=raw)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.stat().st_size, writer.data_alignment


def gguf_bytes(loaded: LoadedModel, types: tuple[str, ...] = ("f16", "q8_0", "q4_0")) -> dict[str, GGUFBytes] | None:
    """The GGUF file of each export type, by part; None when this model cannot be exported."""
    from kompakt.errors import KompaktError
    from kompakt.export.gguf import grid_modules, prepare_gguf
    from kompakt.export.gguf_tensors import plan_tensors

    try:
        family, config, vocab, _ = prepare_gguf(loaded, types[0])
        sizes = {}
        for ttype in types:
            plan = plan_tensors(loaded.model, config, family, ttype, grid_modules(loaded.model))
            header, align = _header_bytes(loaded, family, config, vocab, plan)
            parts = {"embedding": 0, "layers": 0, "other": _pad(header, align)}
            embedding_type, elements = ttype, 0
            for item in plan.tensors:
                part = "layers" if item.gguf_name.startswith("blk.") else "other"
                if item.gguf_name in EMBEDDING_TENSORS:
                    part, elements = "embedding", elements + math.prod(item.shape)
                parts[part] += _pad(tensor_bytes(item.shape, item.type), align)
                if item.gguf_name == "token_embd.weight":
                    embedding_type = item.type
            sizes[ttype] = GGUFBytes(sum(parts.values()), parts["other"], parts["embedding"], parts["layers"],
                                     embedding_type, elements)  # fmt: skip
    except KompaktError as error:
        logger.info("no GGUF sizes: %s", error)
        return None
    return sizes



@dataclass
class TensorLayout:
    """The export's file as a per-tensor allocation sees it: the bytes no type choice changes
    (header, alignment, the F32 norms) and the weight matrices whose type is chosen."""

    fixed: int  # with no type-source keys in the header (see fixed_with_source)
    align: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # module name (recipe key) -> (GGUF name, HF shape)
    header: int = 0  # bytes before the tensor data, unpadded, with no type-source keys

    def tensor_bytes(self, name: str, ttype: str) -> int:
        """Bytes `name` takes in the file (aligned as the writer aligns) when stored as `ttype`."""
        return _pad(tensor_bytes(self.tensors[name][1], ttype), self.align)


def tensor_layout(loaded: LoadedModel) -> TensorLayout | None:
    """The layout of the quantized GGUF file export writes for `loaded` (None when it cannot be
    exported). The header is sized for a quantized file type: its keys and tensor infos have
    the same size whatever the per-tensor types are."""
    from kompakt.errors import KompaktError
    from kompakt.export.gguf import prepare_gguf

    try:
        family, config, vocab, plan = prepare_gguf(loaded, "q8_0")
    except KompaktError as error:
        logger.info("no GGUF layout: %s", error)
        return None
    plan.source = {}  # a planned file's source keys are added by fixed_with_source
    header, align = _header_bytes(loaded, family, config, vocab, plan)
    fixed, tensors = _pad(header, align), {}
    for item in plan.tensors:
        if len(item.shape) == 2:
            tensors[item.hf_name.removesuffix(".weight")] = (item.gguf_name, tuple(item.shape))
        else:
            fixed += _pad(tensor_bytes(item.shape, item.type), align)
    return TensorLayout(fixed, align, tensors, header)


def metadata_bytes(source: dict[str, str]) -> int:
    """Bytes the type-source keys take in a GGUF header (kompakt.export.gguf.add_header writes
    "source" as kompakt.tensor_types.source, other keys as kompakt.<key>): per string key-value,
    u64 key length + key + u32 value type + u64 string length + string."""
    total = 0
    for key, value in source.items():
        name = "kompakt.tensor_types.source" if key == "source" else f"kompakt.{key}"
        total += 8 + len(name.encode()) + 4 + 8 + len(value.encode())
    return total


def fixed_with_source(fixed: int, header: int, align: int, source: dict[str, str]) -> int:
    """The file's bytes outside the weight matrices once the header also says where the types
    came from (`fixed`, `header`, `align`: a TensorLayout's, without those keys)."""
    return fixed - _pad(header, align) + _pad(header + metadata_bytes(source), align)
