"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (the usual LM recipe)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """The learning-rate multiplier after `step` optimizer steps (LambdaLR convention).

    Warm-up rises linearly from 1/(warmup+1) to 1 over `warmup_steps`, then a half cosine falls
    to `min_ratio` at `total_steps` (and stays there if training runs longer).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    """`warmup` < 1 is a fraction of the run, >= 1 a number of steps."""
    steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return max(0, min(steps, total_steps - 1))


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps,
                                              min_ratio=min_ratio),
    )  # fmt: skip
