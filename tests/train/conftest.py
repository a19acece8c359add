"""Shared by the kill-and-resume tests: a tiny model with its training text, a recipe
(prune.depth, then distill.kd) on it, and readers of a run's checkpoints and step weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from kompakt.model.tiny import save_tiny


@pytest.fixture
def kd_recipe(tmp_path):
    """write(kd config, name) -> path of a recipe: prune one layer of a tiny llama, then distill.kd."""
    save_tiny("llama", tmp_path / "tiny")
    words = "the a model layer small token weight data run step of to and in".split()
    rng = random.Random(0)
    (tmp_path / "data.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    data = {"calibration": str(tmp_path / "data.txt"), "calibration_blocks": 4, "block_len": 32,
            "eval_tokens": 256, "window": 64, "stride": 64}  # fmt: skip

    def write(kd: dict, name: str = "recipe") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": str(tmp_path / "tiny"), "seed": 3, "data": data,
                                        "steps": [{"prune.depth": {"count": 1}}, {"distill.kd": kd}]}))  # fmt: skip
        return path

    return write


def checkpoint_step(out: Path) -> int:
    """The newest complete training checkpoint's step in run directory `out` (0 when none)."""
    steps = [int(p.name.split("-")[1]) for p in out.glob("steps/.ckpt-*/step-*") if "tmp" not in p.name]
    return max(steps, default=0)


def step_weights(directory: Path) -> dict:
    """Every tensor of a saved step directory, by name."""
    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.fixture
def run_readers():
    """(checkpoint_step, step_weights)."""
    return checkpoint_step, step_weights
