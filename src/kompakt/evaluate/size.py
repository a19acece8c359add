"""Model size: unique parameters, bytes of parameters in memory, bytes of weights on disk."""

from __future__ import annotations

from pathlib import Path

import torch

# Files that make up a model directory's weights (plus config.json); tokenizer files are
# not counted so sizes compare across export formats.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    # Tied weights (embedding = lm_head) are one Parameter object seen twice; count it once.
    seen: dict[int, torch.nn.Parameter] = {}
    for param in model.parameters():
        seen.setdefault(id(param), param)
    return list(seen.values())


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(param.numel() for param in _unique_parameters(model))


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the unique parameters take in memory in their current dtype."""
    return sum(param.numel() * param.element_size() for param in _unique_parameters(model))


def disk_bytes(path: str | Path | None) -> int | None:
    """Bytes of the weight files + config.json of a model directory (or one weight file);
    None for a model that only lives in memory."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    total = 0
    for item in path.iterdir():
        if item.is_file() and (item.suffix in WEIGHT_SUFFIXES or item.name == "config.json"):
            total += item.stat().st_size
    return total
