"""GGUF export of a model directory one tensor at a time: peak memory is one tensor, not the model.

    lazy = open_streamable("Llama-2-7b-hf")            # None: this model is exported in memory
    write_gguf_streamed(lazy, "llama-q4_0.gguf", type="q4_0")

The model is opened without its weights (kompakt.model.lazy: a meta-device skeleton over the
memory-mapped safetensors, sharded or not), so every model-level decision of the in-memory
export is taken from the same skeleton by the same code (kompakt.export.gguf.prepare_gguf: family,
tokenizer, tied output, per-tensor types, recorded grids, carried K-quant bytes). The file is
then written the way gguf-py's writer allows without holding the tensors: every tensor info
first (its type and byte size follow from the plan), then the header, then each tensor read,
converted (permuted, shifted, quantized: kompakt.export.gguf_tensors.tensor_data) and written
in turn. The bytes are the same as the in-memory export's (tests/export/test_gguf_stream.py
compares them on every tiny family and on SmolLM2).

Exported in memory instead (open_streamable returns None, and says why in the log): a model
whose weights are stored packed (compressed-tensors, densified whole on load), factorized
(lowrank.svd: `--merge` multiplies the factors) or shared (share.layers), and sentence encoders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from kompakt.export.gguf import GGUFExport, add_header, converted_tensors, write_gguf_with
from kompakt.export.gguf_tensors import GGUFPlan, TensorPlan
from kompakt.model.loaded import LoadedModel
from kompakt.ops import ggml_types
from kompakt.process_memory import return_freed_memory

log = logging.getLogger(__name__)


def stream_blocker(directory: Path, packed: bool = False) -> str | None:
    """Why the model in `directory` has to be exported in memory, or None when it can stream.
    `packed`: a compressed-tensors directory counts as streamable (kompakt.model.lazy dequantizes
    it layer by layer, as evaluation reads it; the export keeps its exact grid only in memory)."""
    from kompakt.model.arch import is_encoder_family
    from kompakt.model.compression import stores_shared
    from kompakt.model.hf_dir import read_config
    from kompakt.model.lowrank_load import factorized_class
    from kompakt.model.quantized import is_compressed_config

    config = read_config(directory)
    if is_compressed_config(config) and not packed:
        return "its weights are stored packed (compressed-tensors) and are densified whole"
    if stores_shared(config):
        return "it stores shared layers (share.layers)"
    if factorized_class(config, str(directory)) is not None:
        return "it stores factorized Linears (lowrank.svd)"
    if is_encoder_family(config):
        return "it is a sentence encoder"
    return None


def open_streamable(source: str | Path | None, packed: bool = False):
    """The LazyModel of `source` (kompakt.load's sources: a directory, a .gguf converted once, an
    embedded name), or None when it has to be read in memory (stream_blocker, `packed` as there)."""
    from kompakt.model.lazy import open_lazy
    from kompakt.model.lazy_index import NotLazyError
    from kompakt.model.load import resolve_model

    directory, name = resolve_model(source)
    why = stream_blocker(directory, packed)
    if why is None:
        try:
            return open_lazy(directory, name=name)
        except NotLazyError as error:  # e.g. per-expert MoE weights that transformers fuses on load
            why = str(error)
    log.info("%s is read in memory, not tensor by tensor: %s", directory, why)
    return None


def skeleton_loaded(lazy) -> LoadedModel:
    """The LoadedModel the export plans from: the meta skeleton, its tokenizer and the exact GGUF
    bytes a quant step saved beside the weights (kompakt.model.gguf_blocks), as kompakt.load has."""
    from kompakt.model.gguf_blocks import load_blocks

    loaded = lazy.loaded()
    loaded.gguf_blocks = load_blocks(lazy.directory, mmap=True)  # read when its tensor is written
    return loaded


def write_gguf_streamed(lazy, path: str | Path, *, type: str = "f16", force: bool = False,
                        tensor_types: list[str] | None = None, imatrix: str | Path | None = None) -> GGUFExport:  # fmt: skip
    """Write the lazily opened model `lazy` as a GGUF file (kompakt.export.gguf.write_gguf's
    arguments, checks and result), reading one tensor at a time."""
    return write_gguf_with(_streaming_writer(lazy), skeleton_loaded(lazy), path, type=type, force=force,
                           tensor_types=tensor_types, imatrix=imatrix)  # fmt: skip


def file_layout(item: TensorPlan) -> tuple[np.dtype, tuple[int, ...], int, Any]:
    """(array dtype, array shape, bytes, raw ggml type or None) of the array tensor_data returns
    for `item`: what the tensor info says before the tensor is read. Quantized types (and bf16)
    are uint8 rows of blocks, as gguf-py's writer takes them."""
    shape = tuple(int(d) for d in item.shape)
    if item.type == "f32":
        return np.dtype(np.float32), shape, 4 * int(np.prod(shape)), None
    if item.type == "f16":
        return np.dtype(np.float16), shape, 2 * int(np.prod(shape)), None
    t = ggml_types.ggml_type(item.type)
    nbytes = t.tensor_bytes(shape)
    byte_shape = (*shape[:-1], shape[-1] // t.block * t.block_bytes)
    return np.dtype(np.uint8), byte_shape, nbytes, ggml_types.gguf_enum(item.type)


def _reader(lazy):
    """read(hf_name) -> the stored tensor (as stored; tensor_data casts to fp32 exactly as the
    in-memory fp32 load does), its module materialised and released at once."""

    def read(hf_name: str):
        module_path, _, attr = hf_name.rpartition(".")
        module = lazy.materialize(module_path)
        tensor = getattr(module, attr).detach()
        lazy.release(module_path)
        return tensor

    return read


def _streaming_writer(lazy):
    def write(tmp: Path, loaded: LoadedModel, family, config, vocab, plan: GGUFPlan, result: GGUFExport) -> None:
        import gguf

        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)])
        add_header(writer, loaded, plan, config, family, vocab)
        layouts = {}
        for item in plan.tensors:
            dtype, shape, nbytes, raw = layouts[item.gguf_name] = file_layout(item)
            writer.add_tensor_info(item.gguf_name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item, data, raw_type in converted_tensors(plan, _reader(lazy), config, family, result):
            dtype, shape, nbytes, raw = layouts[item.gguf_name]
            if data.dtype != dtype or tuple(data.shape) != shape or raw_type != raw:
                raise RuntimeError(f"{item.gguf_name}: announced {dtype}{shape} but converted to "
                                   f"{data.dtype}{tuple(data.shape)}")  # fmt: skip
            writer.write_tensor_data(data)
            del data
            return_freed_memory()  # one tensor at a time also in the allocator's eyes
        writer.close()

    return write
