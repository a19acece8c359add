"""A recipe killed with SIGKILL in the middle of distill.kd resumes from the step's last training
checkpoint (kept in the run directory) and ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from kompakt.rundir.lineage import read_lineage

SCRIPT = Path(__file__).parent / "train_run_script.py"


def _run(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(recipe), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_kill_mid_training_then_resume_gives_samestep_weights(tmp_path, kd_recipe, run_readers):
    checkpoint_step, step_weights = run_readers
    recipe = kd_recipe({"steps": 14, "seq_len": 32, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3})
    killed = _run(recipe, tmp_path / "killed")
    straight = _run(recipe, tmp_path / "straight")
    deadline = time.time() + 240
    while checkpoint_step(tmp_path / "killed") < 6:
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
    a = step_weights(tmp_path / "killed" / "steps" / "02-distill.kd")
    b = step_weights(tmp_path / "straight" / "steps" / "02-distill.kd")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not list((tmp_path / "killed" / "steps").glob(".ckpt-*"))  # removed once the step is saved
    record = read_lineage(tmp_path / "killed")[1]
    assert record["details"]["resumed_from"] >= 6 and record["details"]["steps"] == 14
