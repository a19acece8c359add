"""Safetensors shards written as they fill, named as transformers' sharded save names them (shards
+ index), and the checkpoint names transformers stores a model's tensors under: what the streamed
step writer (kompakt.model.stream_save) and the GGUF conversion (kompakt.model.gguf_convert)
write with, never holding more than one shard."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SHARD_BYTES = 2 * 1024**3  # transformers' default max_shard_size is 5 GB; smaller shards flush RAM sooner


class ShardWriter:
    """Safetensors shards of at most `shard_bytes`, each written as soon as it is full."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES,
                 rename: Callable[[str], str] = lambda name: name) -> None:  # fmt: skip
        self.directory, self.shard_bytes, self.rename = directory, shard_bytes, rename
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, int] = {}  # tensor name -> shard number
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        name = self.rename(name)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.weight_map[name] = len(self.files)
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"shard-{len(self.files):05d}.safetensors"
        temp = self.directory / f".{name}.tmp"  # complete or absent: a resumed step trusts what it finds
        save_file(self.pending, str(temp), metadata={"format": "pt"})
        temp.rename(self.directory / name)
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Flush, give the shards transformers' names and write the index (one shard: no index)."""
        self.flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old, new in zip(self.files, names):
            (self.directory / old).rename(self.directory / new)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t: names[i] for t, i in sorted(self.weight_map.items())}}  # fmt: skip
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_names(model: nn.Module) -> Callable[[str], str]:
    """Model tensor name -> the name transformers' save_pretrained would store it under (its key
    renamings reversed: Gemma 3's `model.language_model.*` is stored as `language_model.model.*`),
    so the result reads like any saved checkpoint; the identity for most families."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    reverse = [t.reverse_transform() for t in transforms[::-1]]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]

    def rename(name: str) -> str:  # transformers' apply_renamings (5.2x only), with what 5.x all have
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        return name

    return rename if renamings else (lambda name: name)
