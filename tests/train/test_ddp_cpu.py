"""`torchrun` with two CPU processes (DDP over gloo, what `accelerate launch` does on GPUs): each
process runs the recipe into its own run directory, gradients are averaged, and the result is
bit-identical to one process with two-step gradient accumulation — also when the DDP run is
killed with SIGKILL mid-training and resumed from each process's checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from kompakt.model.tiny import save_tiny
from kompakt.recipe.lineage import read_lineage
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).parent / "train_run_script.py"
KD = {"steps": 10, "seq_len": 32, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2}


def _recipe(tmp_path: Path, **kd) -> Path:
    data = {"calibration": str(tmp_path / "data.txt"), "calibration_blocks": 4, "block_len": 32,
            "eval_tokens": 256, "window": 64, "stride": 64}  # fmt: skip
    path = tmp_path / f"recipe-{len(kd)}.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "tiny"), "seed": 3, "data": data,
                                    "steps": [{"prune.depth": {"count": 1}}, {"distill.kd": {**KD, **kd}}]}))  # fmt: skip
    return path


def _torchrun(recipe: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(recipe), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _kill_all(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts them in sessions of their own)."""
    workers = psutil.Process(launcher.pid).children(recursive=True)
    for process in [launcher, *workers]:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    psutil.wait_procs(workers, timeout=30)


def _checkpoint_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("steps/.ckpt-*/step-*") if "tmp" not in p.name]
    return max(steps, default=0)


def _weights(directory: Path) -> dict:
    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in load_file(file).items()}


def test_two_processes_equal_one_with_gradient_accumulation_also_after_a_kill(tmp_path):
    save_tiny("llama", tmp_path / "tiny")
    words = "the a model layer small token weight data run step of to and in".split()
    rng = random.Random(0)
    (tmp_path / "data.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    out = tmp_path / "ddp"
    ranks = (out, tmp_path / ".ddp.rank-1")

    killed = _torchrun(_recipe(tmp_path), out)
    deadline = time.time() + 240
    while min(_checkpoint_step(rank) for rank in ranks) < 4:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.time() < deadline, "DDP training never reached step 4"
        time.sleep(0.05)
    _kill_all(killed)
    resumed = _torchrun(_recipe(tmp_path), out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    single = run_recipe(Recipe.from_file(_recipe(tmp_path, grad_accum=2)), tmp_path / "single")
    expected = _weights(single.out_dir / "steps" / "02-distill.kd")
    for rank in ranks:
        record = read_lineage(rank)[1]
        assert record["details"]["resumed_from"] >= 4 and record["details"]["tokens"] == 10 * 2 * 2 * 32
        got = _weights(rank / "steps" / "02-distill.kd")
        assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got), rank
