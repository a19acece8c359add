"""A recipe killed with SIGKILL in the middle of distill.kd resumes from the step's last training
checkpoint (kept in the run directory) and ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from kompakt.model.tiny import save_tiny
from kompakt.recipe.lineage import read_lineage

SCRIPT = Path(__file__).parent / "train_run_script.py"


def _run(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(recipe), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _weights(directory: Path) -> dict:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _checkpoint_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("steps/.ckpt-*/step-*") if "tmp" not in p.name]
    return max(steps, default=0)


def test_kill_mid_training_then_resume_gives_same_weights(tmp_path):
    save_tiny("llama", tmp_path / "tiny")
    words = "the a model layer small token weight data run step of to and in".split()
    rng = random.Random(0)
    (tmp_path / "data.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    data = {"calibration": str(tmp_path / "data.txt"), "calibration_blocks": 4, "block_len": 32,
            "eval_tokens": 256, "window": 64, "stride": 64}  # fmt: skip
    kd = {"steps": 14, "seq_len": 32, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tmp_path / "tiny"), "seed": 3, "data": data,
                                      "steps": [{"prune.depth": {"count": 1}}, {"distill.kd": kd}]}))  # fmt: skip
    killed = _run(recipe, tmp_path / "killed")
    straight = _run(recipe, tmp_path / "straight")
    deadline = time.time() + 240
    while _checkpoint_step(tmp_path / "killed") < 6:
        assert killed.poll() is None, killed.communicate()[1][-2000:]
        assert time.time() < deadline, "training never reached step 6"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "steps" / "02-distill.kd").exists()

    resumed = _run(recipe, tmp_path / "killed")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-2000:]
    a = _weights(tmp_path / "killed" / "steps" / "02-distill.kd")
    b = _weights(tmp_path / "straight" / "steps" / "02-distill.kd")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not list((tmp_path / "killed" / "steps").glob(".ckpt-*"))  # removed once the step is saved
    record = read_lineage(tmp_path / "killed")[1]
    assert record["details"]["resumed_from"] >= 6 and record["details"]["steps"] == 14
