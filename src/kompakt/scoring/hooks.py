"""Run calibration batches through a model with forward hooks attached, then remove them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kompakt.model.inputs import Batch, model_inputs


def forward_with_hooks(
    model: nn.Module,
    batches: Iterable[Batch],
    handles: list,
    before: Callable[[Batch], None] | None = None,
) -> None:
    """Forward every batch ([batch, seq] ids, or padded sentences with their mask; no grad, no KV
    cache); `before(batch)` runs first (hooks that must leave padding out read its mask). The
    hooks are removed even on error."""
    try:
        with torch.inference_mode():
            for batch in batches:
                if before is not None:
                    before(batch)
                model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
