"""A streamed step killed with SIGKILL between two decoder layers resumes after the last layer it
finished (kompakt.model.stream_resume) and stores the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from recipe_helpers import small_data
from safetensors.torch import load_file

from kompakt.model.lazy import open_lazy
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe
from kompakt.recipe.stream_step import in_memory_bytes, must_spill

SCRIPT = Path(__file__).parent / "stream_kill_script.py"


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _run(recipe: Path, out: Path, budget: str, pause: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "KOMPAKT_TEST_LAYER_PAUSE": str(pause), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(recipe), str(out), budget], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _progress(out: Path) -> int:
    for path in out.glob("steps/.ckpt-*/stream/progress.json"):
        try:
            return json.loads(path.read_text())["layers"]
        except (OSError, ValueError, KeyError):
            return 0
    return 0


@pytest.mark.parametrize("spilled", [True, False], ids=["activations-on-disk", "activations-in-ram"])
def test_kill_between_layers_resumes_after_the_last_finished_layer(tiny_dir, text_file, tmp_path, one_thread, spilled):
    lazy = open_lazy(tiny_dir)
    data = small_data(text_file)
    tokens = data["calibration_blocks"] * data["block_len"]
    budget = 1000 if spilled else in_memory_bytes(lazy, tokens) - 1  # streamed; activations in RAM unless 1 KB
    assert must_spill(lazy, budget, tokens) == spilled and lazy.n_layers >= 3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_dir), "seed": 3, "data": data,
                                      "steps": [{"quant.gptq": {"bits": 4, "group_size": 32}}]}))  # fmt: skip
    killed = _run(recipe, tmp_path / "killed", str(budget), pause=60)
    straight = run_recipe(Recipe.from_file(recipe), tmp_path / "straight", max_memory=budget)  # meanwhile
    deadline = time.time() + 120
    while _progress(tmp_path / "killed") < 2:
        assert killed.poll() is None, killed.communicate()[1][-2000:]
        assert time.time() < deadline, "two layers were never finished"
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)  # while it pauses after layer 1
    killed.wait()
    assert not (tmp_path / "killed" / "final").exists()

    resumed = run_recipe(Recipe.from_file(recipe), tmp_path / "killed", max_memory=budget)  # the same command again
    assert "resumed: layers 0-1 were finished by an earlier run" in resumed.records[-1]["details"]["notes"]
    assert "resumed" not in " ".join(straight.records[-1]["details"]["notes"])
    a, b = tmp_path / "killed" / "final", tmp_path / "straight" / "final"
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    assert all(wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert not list((tmp_path / "killed" / "steps").glob(".ckpt-*"))  # the resume state is gone once saved
