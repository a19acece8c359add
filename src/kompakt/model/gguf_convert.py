"""Convert a .gguf file once into a Hugging Face directory in the cache.

transformers reads GGUF (dequantizing every tensor), but a model loaded that way refuses
`save_pretrained` and each load re-parses the file (tens of seconds). So a GGUF is
converted once: validated with gguf.GGUFReader, loaded by transformers, stripped of its
GGUF quantization state, saved as safetensors + tokenizer into
`<cache>/models/gguf/<stem>-<key>/`, atomically. Later loads read that directory in seconds.

Weights are saved in fp32: the dequantized values (scale * q + min of Q4/Q5/Q6/Q8 blocks)
are exact in fp32 but not in bf16/fp16, and BENCH.md defines the original model as the
fp32 dequantization. Cost: 4 bytes per parameter on disk (SmolLM2 538 MB, Gemma 3 1.1 GB).

The key is a hash of the resolved path, size, mtime and CONVERSION_VERSION, so a replaced
file converts again; the file's sha256 is recorded in `kompakt-source.json`.
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

CONVERSION_VERSION = 1  # bump to invalidate every cached conversion
SOURCE_RECORD = "kompakt-source.json"
SAVE_DTYPE = torch.float32
# GGUF architecture names whose transformers model_type differs.
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}
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
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES or model_type not in ARCHITECTURES:
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name)
    start = time.perf_counter()
    with _reuse_reader(path, reader), quiet_third_party():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            log.debug("tokenizer converted in %.1f s", time.perf_counter() - start)
            model, loading = AutoModelForCausalLM.from_pretrained(
                path.parent, dtype=SAVE_DTYPE, output_loading_info=True, **kwargs
            )
            log.debug("weights dequantized after %.1f s", time.perf_counter() - start)
        except KompaktError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure parsing an untrusted file is a format error
            raise _corrupt(path, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        if loading.get("missing_keys"):
            missing = sorted(loading["missing_keys"])
            raise _corrupt(path, f"{len(missing)} weights missing, e.g. {missing[0]}")
        _check_finite(path, model)
        _strip_gguf_quantization(model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        log.debug("saved after %.1f s", time.perf_counter() - start)
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


def _check_finite(path: Path, model: torch.nn.Module) -> None:
    # A flipped bit in a block scale can turn a whole block into inf/NaN: refuse it here.
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise _corrupt(path, f"non-finite values in {name}")


def _strip_gguf_quantization(model) -> None:
    """Make a GGUF-loaded model a plain fp model that save_pretrained accepts."""
    model.hf_quantizer = None  # transformers refuses to save while a non-serializable quantizer is set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


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
