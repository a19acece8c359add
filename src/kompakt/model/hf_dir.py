"""Checks on a local Hugging Face model directory, done before transformers reads a weight.

kompakt only loads safetensors (never pickles), so a directory holding only
pytorch_model.bin / *.pt is refused with the command that converts it. Safetensors
headers are checked against file sizes, so a truncated download fails in one line
instead of deep inside transformers.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import torch

from kompakt.errors import ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError
from kompakt.model.arch import ARCHITECTURES, unsupported_message

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def read_config(directory: Path) -> dict:
    """config.json of a model directory, checked for a supported decoder-only architecture."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory; "
            "pass the directory that holds config.json and *.safetensors, or a .gguf file"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{config_path} is not valid JSON ({exc}); restore it from the original model") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{config_path} does not hold a JSON object; restore it from the original model")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(unsupported_message(model_type, config))
    return config


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a directory (all shards of an index), refusing pickle-only ones."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index} is unreadable ({exc}); restore it from the original model") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ModelFormatError(
                f"{directory} misses {len(missing)} of {len(files)} weight shards (e.g. {missing[0]}); "
                "copy or download the model again"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFormatError(
            f"{directory} holds only PyTorch pickle weights ({pickles[0]}), which kompakt never loads; "
            "convert it once in an environment you trust: load it with transformers and call "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelFormatError(f"{directory} has no *.safetensors weights; copy or download the model again")


def check_safetensors(path: Path) -> Counter:
    """Validate one safetensors file's header against its size; bytes per dtype.

    Raises:
        ModelFormatError: truncated file, bad header, or tensor extents that do not fit.
    """
    size = path.stat().st_size

    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(f"{path} is truncated or corrupt ({why}); copy or download the model again")

    if size < 8:
        raise bad("shorter than its header")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            raise bad("header length exceeds the file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = size - 8 - header_len
    dtype_bytes: Counter = Counter()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype, itemsize = _SAFETENSORS_DTYPES.get(entry["dtype"], (None, 0))
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name} has a malformed header entry") from None
        if end > data_size:
            raise bad(f"tensor {name} ends at byte {end} of {data_size}")
        if itemsize and end - begin != numel * itemsize:
            raise bad(f"tensor {name} has {end - begin} bytes for {numel} values")
        if dtype is not None:
            dtype_bytes[dtype] += end - begin
    return dtype_bytes


def storage_dtype(dtype_bytes: Counter) -> torch.dtype:
    """The floating dtype holding most weight bytes (fp32 if there is none)."""
    floating = {dtype: n for dtype, n in dtype_bytes.items() if dtype.is_floating_point}
    if not floating:
        return torch.float32
    return max(floating.items(), key=lambda item: item[1])[0]


def check_model_dir(directory: Path) -> tuple[dict, torch.dtype]:
    """Validate a model directory before loading: its config and every weight file.

    Returns:
        (config.json as a dict, the dtype the weights are stored in).
    """
    config = read_config(directory)
    dtype_bytes: Counter = Counter()
    for file in safetensors_files(directory):
        dtype_bytes.update(check_safetensors(file))
    return config, storage_dtype(dtype_bytes)
