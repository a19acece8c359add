"""Test-only passes and fixtures for runner tests (also used by the kill -9 subprocess script)."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.passes.base import PassContext, PassReport, PassSpec

CALLS: list[str] = []  # names of test passes applied in this process


@dataclass
class NoiseConfig:
    scale: float = 0.01
    tag: str = ""


def _noise(ctx: PassContext, config: NoiseConfig) -> PassReport:
    """Adds seeded noise (torch's global RNG, seeded by the runner) to every weight.

    With KOMPAKT_TEST_SLEEP_TAG == tag, touches the marker file KOMPAKT_TEST_SLEEP_MARKER
    halfway and sleeps, so a test can kill the process mid-step."""
    CALLS.append(config.tag)
    params = list(ctx.loaded.model.parameters())
    with torch.no_grad():
        for index, param in enumerate(params):
            param.add_(torch.randn_like(param) * config.scale)
            if index == len(params) // 2 and os.environ.get("KOMPAKT_TEST_SLEEP_TAG") == config.tag:
                Path(os.environ["KOMPAKT_TEST_SLEEP_MARKER"]).write_text("in step")
                time.sleep(300)
    return PassReport(loaded=ctx.loaded, summary=f"noise {config.scale}", details={})


NOISE = PassSpec(name="test.noise", config=NoiseConfig, apply=_noise, doc="Test-only: seeded noise.")


def register_test_passes() -> None:
    from kompakt.passes.base import _REGISTRY, registry

    registry()
    _REGISTRY.setdefault(NOISE.name, NOISE)


def write_text(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    """A deterministic pseudo-English text file (byte-level tiny tokenizer: 1 token per byte)."""
    rng = random.Random(seed)
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n_words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def small_data(calibration: Path) -> dict:
    return {"calibration": str(calibration), "calibration_blocks": 8, "block_len": 32,
            "eval_tokens": 256, "window": 64, "stride": 64}  # fmt: skip


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor the safetensors shards of a saved model directory hold, by stored name."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors
