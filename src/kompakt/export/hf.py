"""Export as a Hugging Face directory (safetensors + tokenizer + config) with a sha256 manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kompakt.errors import ConfigError, OutputPathError
from kompakt.export.manifest import write_manifest
from kompakt.model.loaded import LoadedModel

HF_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_hf(loaded: LoadedModel, directory: str | Path, *, type: str | None = None, force: bool = False) -> Path:
    """Save `loaded` to `directory` in `type` (default: its storage dtype) and write SHA256SUMS."""
    from kompakt.model.save import save_model

    target = Path(directory).expanduser().absolute()
    if target.exists() and not force:
        raise OutputPathError(f"{target} exists; pass --force (force=True) to replace it or choose another name")
    if type is not None and type.lower() not in HF_TYPES:
        raise ConfigError(
            f"--format hf takes --type {', '.join(HF_TYPES)}; got {type!r} (use --format gguf for quantized types)"
        )
    if type is not None:
        loaded = dataclasses.replace(loaded, storage_dtype=HF_TYPES[type.lower()])
    path = save_model(loaded, target)
    write_manifest(path)
    return path
