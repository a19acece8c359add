"""`torchrun` with two CPU processes (DDP over gloo, what `accelerate launch` does on GPUs): each
process runs the recipe into its own run directory, gradients are averaged, and the result is
bit-identical to one process with two-step gradient accumulation — also when the DDP run is
killed with SIGKILL mid-training and resumed from each process's checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kompakt.rundir.lineage import read_lineage
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).parent / "train_run_script.py"
KD = {"steps": 10, "seq_len": 32, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2}


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


def test_two_processes_equal_one_with_gradient_accumulation_also_after_a_kill(tmp_path, kd_recipe, run_readers):
    checkpoint_step, step_weights = run_readers
    recipe = kd_recipe(KD)
    out = tmp_path / "ddp"
    ranks = (out, tmp_path / ".ddp.rank-1")

    killed = _torchrun(recipe, out)
    deadline = time.time() + 240
    while min(checkpoint_step(rank) for rank in ranks) < 4:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.time() < deadline, "DDP training never reached step 4"
        time.sleep(0.05)
    _kill_all(killed)
    resumed = _torchrun(recipe, out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    single = run_recipe(Recipe.from_file(kd_recipe({**KD, "grad_accum": 2}, "single")), tmp_path / "single")
    expected = step_weights(single.out_dir / "steps" / "02-distill.kd")
    for rank in ranks:
        record = read_lineage(rank)[1]
        assert record["details"]["resumed_from"] >= 4 and record["details"]["tokens"] == 10 * 2 * 2 * 32
        got = step_weights(rank / "steps" / "02-distill.kd")
        assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got), rank
