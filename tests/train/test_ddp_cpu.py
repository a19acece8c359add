"""`torchrun` with two CPU processes over gloo, DDP (what `accelerate launch` does on GPUs) and
FSDP (kompakt.train.fsdp: parameters, gradients and AdamW state sharded): each process runs the
recipe into its own run directory, and the result equals one process with two-step gradient
accumulation — also when the run is killed with SIGKILL mid-training and resumed from each
process's checkpoint. DDP is bit-identical. FSDP's reduce-scatter and its gradient norm summed
from shards round differently in the last bit; without autocast that stays ~1e-8 after 10 steps,
but under bf16 autocast (CPUs with native bf16) a last-bit change can flip a weight's bf16
rounding, and the runs drift to ~2e-5. A real fault (gradients not reduced, wrong batches, a bad
resume) moves them further: with the gradient reduce switched off the drift was 6e-3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from kompakt.rundir.lineage import read_lineage
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).parent / "train_run_script.py"
KD = {"steps": 10, "seq_len": 32, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2}


def _torchrun(recipe: Path, out: Path, fsdp: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(recipe), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true" if fsdp else "false"}
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


def _rng_in_checkpoint(out: Path) -> torch.Tensor:
    """The torch RNG state saved in run directory `out`'s newest training checkpoint."""
    from kompakt.train import checkpoint

    newest = checkpoint.latest(next(out.glob("steps/.ckpt-*")))
    return checkpoint.load(newest)[2]["rng"]["torch"]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_with_gradient_accumulation_also_after_a_kill(tmp_path, kd_recipe, run_readers, fsdp):
    checkpoint_step, step_weights = run_readers
    recipe = kd_recipe(KD)
    out = tmp_path / "ddp"
    ranks = (out, tmp_path / ".ddp.rank-1")

    killed = _torchrun(recipe, out, fsdp)
    deadline = time.time() + 240
    while min(checkpoint_step(rank) for rank in ranks) < 4:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.time() < deadline, "DDP training never reached step 4"
        time.sleep(0.05)
    _kill_all(killed)
    assert not torch.equal(*(_rng_in_checkpoint(rank) for rank in ranks))  # own dropout masks per process
    resumed = _torchrun(recipe, out, fsdp)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    single = run_recipe(Recipe.from_file(kd_recipe({**KD, "grad_accum": 2}, "single")), tmp_path / "single")
    expected = step_weights(single.out_dir / "steps" / "02-distill.kd")
    for rank in ranks:
        record = read_lineage(rank)[1]
        assert record["details"]["resumed_from"] >= 4 and record["details"]["tokens"] == 10 * 2 * 2 * 32
        assert record["details"]["local_fraction"] == (pytest.approx(0.5, abs=0.02) if fsdp else 1.0)
        got = step_weights(rank / "steps" / "02-distill.kd")
        assert got.keys() == expected.keys(), rank
        for name in got:
            if fsdp:
                torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4, msg=name)
            else:
                assert (got[name] == expected[name]).all(), (rank, name)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_hidden_state_projection_is_trained_alike_in_every_process(tmp_path, kd_recipe, run_readers, fsdp):
    """The objective's projection (the student is narrower than the teacher) lives outside the
    model, so it is averaged (DDP) or sharded (FSDP) by kompakt itself: without that each process
    would train its own and the runs would part. The training text is a file far longer than the
    budget, so each process must read what all of them use together, not its own share."""
    _, step_weights = run_readers
    kd = {**KD, "steps": 4, "checkpoint_every": 0, "hidden_weight": 1.0, "data": str(tmp_path / "data.txt")}
    recipes = [kd_recipe(kd), kd_recipe({**kd, "grad_accum": 2}, "single")]
    for path in recipes:
        recipe = yaml.safe_load(path.read_text())
        recipe["steps"][0] = {"prune.width": {"mlp_fraction": 0.5, "hidden_fraction": 0.25}}
        path.write_text(yaml.safe_dump(recipe))
    launched = _torchrun(recipes[0], tmp_path / "two", fsdp)
    _, err = launched.communicate(timeout=300)
    assert launched.returncode == 0, err[-3000:]
    single = run_recipe(Recipe.from_file(recipes[1]), tmp_path / "single")
    expected = step_weights(single.out_dir / "steps" / "02-distill.kd")
    got = step_weights(tmp_path / "two" / "steps" / "02-distill.kd")
    assert got["model.norm.weight"].shape[0] < 64  # narrower than the teacher: a projection was trained
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4 if fsdp else 0, msg=name)


@pytest.mark.parametrize("step", ["finetune.lora", "quant.qat"])
def test_fsdp_trains_the_other_training_passes_as_one_process_does(tmp_path, kd_recipe, run_readers, step):
    """finetune.lora (a PeftModel: frozen base weights beside the trained adapters) and quant.qat
    (fake quantization) under FSDP end where one process with two-step accumulation ends. LoRA's
    dropout is off: one process draws different masks for its two micro-batches than two
    processes draw for theirs (with it on, DDP parts from one process by 7e-3 too)."""
    _, step_weights = run_readers
    values = {"steps": 4, "seq_len": 32, "batch_size": 2, "lr": 1e-3}
    values.update({"r": 4, "lora_dropout": 0.0} if step == "finetune.lora" else {"bits": 4, "group_size": 32, "lr": 1e-4})
    recipes = [kd_recipe({}), kd_recipe({}, "single")]
    for path, accumulation in zip(recipes, (1, 2), strict=True):
        recipe = yaml.safe_load(path.read_text())
        data = {"data": recipe["data"]["calibration"]} if step == "finetune.lora" else {}
        recipe["steps"] = [{step: {**values, **data, "grad_accum": accumulation}}]
        path.write_text(yaml.safe_dump(recipe))
    launched = _torchrun(recipes[0], tmp_path / "two", fsdp=True)
    _, err = launched.communicate(timeout=300)
    assert launched.returncode == 0, err[-3000:]
    assert read_lineage(tmp_path / "two")[-1]["details"]["local_fraction"] == pytest.approx(0.5, abs=0.02)
    single = run_recipe(Recipe.from_file(recipes[1]), tmp_path / "single")
    expected = step_weights(single.out_dir / "steps" / f"01-{step}")
    got = step_weights(tmp_path / "two" / "steps" / f"01-{step}")
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0, atol=1e-4, msg=name)


def test_a_loss_that_turns_nan_on_one_process_stops_every_process():
    """The divergence stops act on the loss averaged over the processes: a NaN on rank 1 alone
    stops both ranks with the one-line message (before, rank 0 waited in the next all-reduce)."""
    script = Path(__file__).parent / "diverge_script.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode != 0 and done.stdout.count("diverged: ") == 2, done.stdout + done.stderr[-3000:]
    assert "training stopped at step 4: loss nan" in done.stdout and "finished" not in done.stdout
