"""What a recipe run needs to know when `accelerate launch` (or torchrun) starts several processes.

Each process runs the whole recipe: the same passes, the same data, and — because the training
loop's Accelerator averages gradients across processes — the same weights after every step.
So only process 0 writes the real run directory; the others write theirs beside it (never
read by anyone, removed by `--force` like any stale directory) instead of racing on the same
files. Each process computes on its own GPU (LOCAL_RANK), also outside the training loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def process_index() -> int:
    """This process's global rank (0 when not launched by accelerate / torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def process_count() -> int:
    """How many processes train together (1 when not launched by accelerate / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup_process_device() -> None:
    """Make "cuda" mean this process's GPU, so every model it loads lands there."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local))


def run_dir_for_process(out: Path) -> Path:
    """The run directory this process writes: `out` for process 0, a sibling for the others."""
    rank = process_index()
    return out if rank == 0 else out.parent / f".{out.name}.rank-{rank}"
