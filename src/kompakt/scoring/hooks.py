"""Run calibration batches through a model with forward hooks attached, then remove them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def forward_with_hooks(model: nn.Module, batches: Iterable[torch.Tensor], handles: list) -> None:
    """Forward every [batch, seq] id tensor (no grad, no KV cache); the hooks are removed even on error."""
    try:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
