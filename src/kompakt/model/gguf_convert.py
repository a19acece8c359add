"""Convert a .gguf file once into a Hugging Face directory in the cache.

transformers reads GGUF, but it dequantizes the whole model into memory (a 7B file needs 28 GB
in fp32), a model loaded that way refuses `save_pretrained`, and each load re-parses the file.
So a GGUF is converted once, validated with gguf.GGUFReader, into
`<cache>/models/gguf/<stem>-<key>/` (safetensors shards + index, config, tokenizer), atomically,
and its weights are converted one tensor at a time from the memory-mapped file with
transformers' own per-architecture processors (`_write_weights`): the conversion holds one
tensor and one shard, never the model, and the directory is then opened like any other (lazily
under `--max-memory`, kompakt.model.lazy). Later loads read that directory in seconds.

Weights are saved in fp32: the dequantized values (scale * q + min of Q4/Q5/Q6/Q8 blocks)
are exact in fp32 but not in bf16/fp16, and BENCH.md defines the original model as the
fp32 dequantization. Cost: 4 bytes per parameter on disk (SmolLM2 538 MB, Gemma 3 1.1 GB, a 7B
model 28 GB: the room is checked before anything is written).

The key is a hash of the resolved path, size, mtime and CONVERSION_VERSION, so a replaced
file converts again; the file's sha256 is recorded in `kompakt-source.json`.

Library vs ours: the GGUF parsing and dequantization are gguf-py's, the config, tokenizer, name
map and layout processors transformers'; ours is the tensor-by-tensor loop and its checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.errors import KompaktError, ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError
from kompakt.model.arch import ARCHITECTURES, unsupported_message
from kompakt.atomic import atomic_directory
from kompakt.model.cache import cache_subdir
from kompakt.model.progress import quiet_third_party, spinner

log = logging.getLogger(__name__)

CONVERSION_VERSION = 2  # bump to invalidate every cached conversion (2: written tensor by tensor)
SOURCE_RECORD = "kompakt-source.json"
SAVE_DTYPE = torch.float32
SHARD_BYTES = 256 * 1024**2  # written as soon as full: a shard is what the conversion holds beside one tensor
# GGUF architecture names whose transformers model_type differs.
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_GGUF_ENCODERS = ("bert", "modern-bert", "nomic-bert", "jina-bert-v2")  # llama.cpp embedding architectures


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str  # GGUF general.architecture ("llama", "gemma3", ...)
    model_type: str  # the transformers model_type it becomes
    n_tensors: int
    has_chat_template: bool


def _corrupt(path: Path, why: str) -> ModelFormatError:
    return ModelFormatError(f"{path} is not a readable GGUF file ({why}); it is truncated or corrupt: copy or download it again")


def _field_str(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_gguf(path: Path):
    """Open `path` with gguf.GGUFReader, turning every parse failure into a ModelFormatError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}; check the path")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise _corrupt(path, "it does not start with the GGUF magic bytes")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unusable
        raise _corrupt(path, f"{type(exc).__name__}: {str(exc)[:120]}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise _corrupt(path, f"tensor {tensor.name} extends past the end of the file")
    return reader


def inspect_gguf(path: Path, reader=None) -> GGUFInfo:
    """Validate a GGUF file and check that its architecture is one kompakt supports."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = reader if reader is not None else read_gguf(path)
    architecture = _field_str(reader, "general.architecture")
    if architecture is None:
        raise _corrupt(Path(path), "no general.architecture field")
    model_type = _GGUF_MODEL_TYPES.get(architecture, architecture)
    if f"{architecture}.pooling_type" in reader.fields or architecture in _GGUF_ENCODERS:
        raise UnsupportedArchitectureError(
            f"{path} is a sentence-encoder GGUF ({architecture}); kompakt reads encoders from Hugging Face "
            "directories only: load the directory it was exported from (llama.cpp runs the file itself)"
        )
    readable = architecture in GGUF_SUPPORTED_ARCHITECTURES or model_type in GGUF_SUPPORTED_ARCHITECTURES
    if not readable or model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(unsupported_message(model_type) + f" (GGUF architecture {architecture!r})")
    return GGUFInfo(
        path=Path(path),
        architecture=architecture,
        model_type=model_type,
        n_tensors=len(reader.tensors),
        has_chat_template="tokenizer.chat_template" in reader.fields,
    )


def converted_dir_for(path: Path) -> Path:
    """Where the conversion of `path` lives in the cache (it may not exist yet)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_subdir("models", "gguf") / f"{path.stem}-{digest}"


def is_converted(directory: Path) -> bool:
    return (Path(directory) / SOURCE_RECORD).is_file()


def convert_gguf(path: Path | str) -> Path:
    """The cached HF directory of a .gguf file, converting it first if needed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}; check the path")
    target = converted_dir_for(path)
    if is_converted(target):
        return target
    reader = read_gguf(path)
    info = inspect_gguf(path, reader)
    start = time.perf_counter()
    log.info("converting %s (%s) into %s, once", path.name, info.model_type, target)
    with spinner(f"converting {path.name} to a Hugging Face directory (once)"), atomic_directory(target) as tmp:
        _convert_into(path, reader, info, tmp)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - start)
    return target


def _convert_into(path: Path, reader, info: GGUFInfo, out: Path) -> None:
    """Config and tokenizer by transformers' GGUF readers, the weights tensor by tensor
    (`_write_weights`): a GGUF larger than memory converts in the memory of one tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    with _reuse_reader(path, reader), quiet_third_party():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            settings = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
            _complete_config(config, reader, info)
            with torch.device("meta"):  # names and shapes only
                skeleton = AutoModelForCausalLM.from_config(config, dtype=SAVE_DTYPE)
        except KompaktError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure parsing an untrusted file is a format error
            raise _corrupt(path, f"{type(exc).__name__}: {str(exc)[:120]}") from None
    log.debug("config and tokenizer converted in %.1f s", time.perf_counter() - start)
    _write_weights(path, reader, info, settings, skeleton, out)
    log.debug("weights written after %.1f s", time.perf_counter() - start)
    skeleton.config.save_pretrained(out)
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "source": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": _sha256(path),
        "gguf_architecture": info.architecture,
        "model_type": info.model_type,
        "chat_template": info.has_chat_template,
        "saved_dtype": str(SAVE_DTYPE).removeprefix("torch."),
        "conversion_version": CONVERSION_VERSION,
    }
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _write_weights(path: Path, reader, info: GGUFInfo, settings: dict, skeleton: torch.nn.Module, out: Path) -> None:
    """Every weight, read from the memory-mapped file one tensor at a time: dequantized (gguf-py),
    turned into the transformers layout by transformers' own per-architecture processor (q/k rows
    un-permuted, Gemma's norms shifted back, a Qwen-MoE layer's expert stacks joined), checked
    finite, written to safetensors shards of SHARD_BYTES and released. The values are those
    transformers' `from_pretrained(gguf_file=...)` loads (tested per family)."""
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from kompakt.atomic import check_room
    from kompakt.model.shard_writer import ShardWriter, checkpoint_names

    check_room(out / "model.safetensors", sum(int(t.n_elements) for t in reader.tensors) * SAVE_DTYPE.itemsize)
    processor = TENSOR_PROCESSORS.get(info.architecture, TensorProcessor)(config=settings)
    hf_names = get_gguf_hf_weights_map(skeleton, processor)
    writer = ShardWriter(out, SHARD_BYTES, rename=checkpoint_names(skeleton))
    joined: dict[str, dict] = {"tensors": {}}  # what the processor assembles from several tensors
    written: set[str] = set()
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    def write(name: str, weights: torch.Tensor) -> None:
        wanted = shapes.get(name, tuple(weights.shape))
        if tuple(weights.shape) != wanted and [d for d in weights.shape if d != 1] == [d for d in wanted if d != 1]:
            weights = weights.reshape(wanted)  # a gate vector stored [1, n] or [n] (Qwen2-MoE's shared-expert gate)
        if tuple(weights.shape) != wanted:
            raise _corrupt(path, f"{name} is {tuple(weights.shape)} in the file but {wanted} by its header")
        weights = weights.to(SAVE_DTYPE)
        if not torch.isfinite(weights).all():  # a flipped bit in a block scale can make a block inf / NaN
            raise _corrupt(path, f"non-finite values in {name}")
        writer.add(name, weights)
        written.add(name)
        del weights

    def write_joined() -> None:
        for name, weights in joined["tensors"].items():
            write(name, weights)
        joined["tensors"] = {}

    block = None
    with path.open("rb") as handle:
        for tensor in reader.tensors:
            if _block(tensor.name) != block:  # a layer's joined stacks are complete once the next layer starts
                write_joined()
                block = _block(tensor.name)
            stored = _read(handle, tensor)
            result = processor.process(weights=dequantize(stored, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping=hf_names, parsed_parameters=joined)  # fmt: skip
            del stored
            if result.name in hf_names:
                weights = result.weights
                if not (weights.flags.writeable and weights.dtype == np.float32):
                    weights = weights.astype(np.float32)  # a float tensor read as it is stored
                write(hf_names[result.name], torch.from_numpy(np.ascontiguousarray(weights)))
    write_joined()
    writer.close()
    missing = sorted(set(_stored_names(skeleton)) - written)
    if missing:
        raise _corrupt(path, f"{len(missing)} weights missing, e.g. {missing[0]}")


# Config fields transformers' GGUF reader leaves at the family's defaults (Qwen3's head_dim 128, the
# Qwen MoEs' expert widths), so a model whose values differ would not load: GGUF key -> config field.
_FROM_FILE = {"attention.key_length": "head_dim", "expert_feed_forward_length": "moe_intermediate_size",
              "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}  # fmt: skip
# What llama.cpp's graph does with the top-k routing weights, whatever the file says (kompakt's
# export refuses a model that differs): the config must compute the same.
_NORM_TOPK = {"qwen2moe": False, "qwen3moe": True}


def _complete_config(config, reader, info: GGUFInfo) -> None:
    """The fields of `_FROM_FILE` from the file, where the config has them; the routing of `_NORM_TOPK`."""
    for key, attribute in _FROM_FILE.items():
        field = reader.fields.get(f"{info.architecture}.{key}")
        if field is not None and getattr(config, attribute, None) is not None:
            setattr(config, attribute, int(field.parts[field.data[0]][0]))
    if info.architecture in _NORM_TOPK:
        config.norm_topk_prob = _NORM_TOPK[info.architecture]


def _read(handle, tensor):
    """One tensor's stored data, read from the file (not through the reader's memory map: touched
    pages of a map stay resident, and a 4 GB file would end up counted whole)."""
    import numpy as np

    handle.seek(tensor.data_offset)
    raw = handle.read(tensor.n_bytes)
    return np.frombuffer(raw, dtype=tensor.data.dtype).reshape(tensor.data.shape)


def _block(name: str) -> str | None:
    """The decoder layer a GGUF tensor belongs to (`blk.N.`), None outside the layers."""
    return name.split(".")[1] if name.startswith("blk.") else None


def _stored_names(model: torch.nn.Module) -> list[str]:
    """The state-dict names a checkpoint of `model` must hold: a tied head reads the embedding."""
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(param), name)
    persistent = [name for name, _ in model.named_buffers() if name in model.state_dict()]
    return list(seen.values()) + persistent


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _reuse_reader(path: Path, reader) -> Iterator[None]:
    """Let transformers reuse our parsed GGUFReader instead of parsing the file again.

    transformers builds a fresh GGUFReader for the config, the tokenizer and the weights;
    parsing a 262k-token vocabulary takes tens of seconds each time. It imports
    `gguf.GGUFReader` at call time, so swapping the attribute for the duration works.
    """
    import gguf

    original = gguf.GGUFReader
    resolved = os.path.realpath(path)

    def reader_for(file, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(file) == resolved:
            return reader
        return original(file, *args, **kwargs)

    gguf.GGUFReader = reader_for  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = original
