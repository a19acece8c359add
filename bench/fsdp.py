"""distill.kd on SmolLM2 in one process, two DDP processes and two FSDP processes (issue 14's
"training at scale"): peak memory of each process, training speed, and whether the three end
with the same weights.

Each mode runs `kompakt compress --recipe` with one distill.kd step (the original model as its
own teacher, WikiText-2 validation text), launched as a user would:
  one:  python -m kompakt compress ...            (grad_accum 2: the same batches per step)
  ddp:  accelerate launch --multi_gpu --num_processes 2 -m kompakt compress ...  (also on CPUs)
  fsdp: accelerate launch --num_processes 2 --use_fsdp -m kompakt compress ...
Every process runs on one thread (same arithmetic in every mode). Peak RSS is each process's
VmHWM, read every 0.1 s until it exits; a process's peak includes the
teacher, the evaluation and loading, which sharding does not touch, so the difference between
ddp and fsdp is what the sharded gradients and AdamW state save. Run alone on the machine.

  python bench/fsdp.py --steps 8 --seq-len 256 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from heal import DATA, clean_valid_text  # noqa: E402
from results_file import ResultsFile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "one": [sys.executable, "-m", "kompakt"],
    "ddp": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m", "kompakt"],
    "fsdp": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--use_fsdp", "-m", "kompakt"],
}


def recipe(args, work: Path, grad_accum: int) -> Path:
    kd = {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": grad_accum,
          "lr": 1e-4, "data": str(clean_valid_text())}  # fmt: skip
    data = {"calibration": str(clean_valid_text()), "evaluation": str(DATA / "wiki.test.raw"),
            "eval_tokens": args.eval_tokens, "window": 256, "stride": 256}  # fmt: skip
    path = work / f"recipe-{grad_accum}.yaml"
    path.write_text(yaml.safe_dump({"model": None, "seed": 0, "data": data, "metrics": ["ppl", "kl"],
                                    "steps": [{"distill.kd": kd}]}))  # fmt: skip
    return path


def launch(mode: str, recipe_path: Path, out: Path) -> dict:
    """Run one mode; its wall time and the peak RSS of each of its processes (GB)."""
    command = [*MODES[mode], "compress", "--recipe", str(recipe_path), "--out", str(out), "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every mode: one core per process
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while process.poll() is None:
        for child in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
            try:
                peaks[child.pid] = max(peaks.get(child.pid, 0), high_water_mark(child.pid))
            except (psutil.Error, OSError):
                pass
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"{mode} failed: {process.stderr.read()[-2000:]}")
    workers = sorted(peaks.values(), reverse=True)[: 1 if mode == "one" else 2]
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": [round(p / 1e9, 2) for p in workers]}


def high_water_mark(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM, bytes): no peak is missed between samples."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def step_record(out: Path) -> tuple[dict, dict]:
    """(the distill.kd step's details, its weights)."""
    step = out / "steps" / "01-distill.kd"
    details = json.loads((step / "kompakt-step.json").read_text())["details"]
    weights: dict = {}
    for file in step.glob("*.safetensors"):
        weights.update(load_file(file))
    return details, weights


def difference(weights: dict, other: dict, original: dict) -> float:
    """||w - w_other|| / ||w_other - w_original|| over all tensors: how far two runs part, as a
    share of how far training moved the weights. (The largest single-element difference says
    little: Adam moves a weight whose gradient is ~0 by ±lr, so rounding flips its direction.)"""
    apart = sum(float((weights[k].float() - other[k].float()).pow(2).sum()) for k in other)
    moved = sum(float((other[k].float() - original[k].float()).pow(2).sum()) for k in other)
    return (apart / max(moved, 1e-30)) ** 0.5


def original_weights() -> dict:
    from kompakt.model.load import load

    return {k: v.clone() for k, v in load(None).model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kompakt-bench-fsdp"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fsdp.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(args.out, {"protocol": vars(args) | {"work": None, "out": None}}, merge=False)
    finals: dict[str, dict] = {}
    original = original_weights()
    for mode in MODES:
        out = args.work / mode
        measured = launch(mode, recipe(args, args.work, 2 if mode == "one" else 1), out)
        details, finals[mode] = step_record(out)
        results.add({"name": mode, **measured, "tokens_per_s": details["tokens_per_s"],
                     "local_fraction": details["local_fraction"], "loss_last": details["loss_last"],
                     "difference_vs_one": difference(finals[mode], finals["one"], original),
                     "difference_vs_ddp": difference(finals[mode], finals.get("ddp", finals[mode]), original)})  # fmt: skip
    print("| mode | peak RSS per process (GB) | training tok/s | share of params held | apart from one | apart from ddp |")
    print("|---|---|---|---|---|---|")
    for row in results.rows:
        print(f"| {row['name']} | {', '.join(map(str, row['peak_rss_gb']))} | {row['tokens_per_s']:.0f} | "
              f"{row['local_fraction']:.2f} | {row['difference_vs_one']:.1e} | {row['difference_vs_ddp']:.1e} |")  # fmt: skip
    print("apart: ||w - w_other|| / ||w_other - w_original||, the share of training's own move")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
