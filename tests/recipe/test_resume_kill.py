"""A run killed with SIGKILL mid-step resumes from the last finished step and ends with the
same weights as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from recipe_helpers import small_data
from safetensors.torch import load_file

from kompakt.rundir.lineage import read_lineage

SCRIPT = Path(__file__).parent / "run_script.py"


def _weights(directory: Path) -> dict:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _run(recipe: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(recipe), str(out)],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_kill_mid_step_then_resume_gives_same_weights(tiny_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    steps = [
        {"test.noise": {"tag": "a"}},
        {"prune.depth": {"count": 1}},
        {"test.noise": {"tag": "b"}},
        {"prune.depth": {"count": 1, "method": "kl"}},
    ]
    recipe.write_text(yaml.safe_dump({"model": str(tiny_dir), "seed": 7, "data": small_data(text_file), "steps": steps}))
    marker = tmp_path / "in-step-3"
    killed = _run(recipe, tmp_path / "killed", {"KOMPAKT_TEST_SLEEP_TAG": "b", "KOMPAKT_TEST_SLEEP_MARKER": str(marker)})
    straight = _run(recipe, tmp_path / "straight")
    deadline = time.time() + 240
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[1][-2000:]
        assert time.time() < deadline, "step 3 never started"
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert [r["index"] for r in read_lineage(tmp_path / "killed")] == [1, 2]
    assert not (tmp_path / "killed" / "steps" / "03-test.noise").exists()

    resumed = _run(recipe, tmp_path / "killed")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["skipped"] == [True, True, False, False]
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-2000:]

    a, b = _weights(tmp_path / "killed" / "final"), _weights(tmp_path / "straight" / "final")
    assert a.keys() == b.keys() and len(a) > 0
    assert all((a[name] == b[name]).all() for name in a)
    lines_a, lines_b = read_lineage(tmp_path / "killed"), read_lineage(tmp_path / "straight")
    assert [r["hash"] for r in lines_a] == [r["hash"] for r in lines_b]
    assert lines_a[-1]["details"]["removed_layers"] == lines_b[-1]["details"]["removed_layers"]
