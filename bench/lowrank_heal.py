"""SVD-LLM then distill.kd (issue 15), beside depth pruning to the same parameter count healed the same way.

The issue's row: lowrank.svd (svd-llm, 40 % fewer Linear parameters) healed with the depth row's
budget of bench/heal.py, against prune.depth (block influence) removing the fewest layers that
bring the model to at most the factorized model's parameters, healed with the same budget. The
settings, evaluation and row format are bench/share_layers.py's (which compares share.layers the
same way): distill.kd on WikiText-2 validation, 4 x 256 per step, alpha 0.5, T 2, lr 2e-4;
KL(original ‖ candidate), top-1 and perplexity on the first `--eval-tokens` tokens of WikiText-2
test; prefill speed as a ratio to the original measured in the same run. Calibration for both
passes: `--blocks` blocks of 512 tokens of WikiText-2 validation (seed 0).

    .venv/bin/python bench/lowrank_heal.py                       # full budget, alone
    .venv/bin/python bench/lowrank_heal.py --tokens 8192 --eval-tokens 4096 --suffix=-short
Writes bench/results/lowrank_heal<suffix>.json (row by row) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal import apply, calibration, context, copy_model, eval_ids  # noqa: E402
from results_file import ResultsFile  # noqa: E402
from share_layers import RESULTS, depth_rows, heal, prefill_rate, row, run_logged  # noqa: E402


def run(args) -> None:
    from kompakt.model.load import load

    teacher = load("smollm2-135m", device="cpu", dtype="float32")
    ids = eval_ids(teacher.tokenizer)
    calib = calibration(teacher.tokenizer, args.blocks)
    header = {"bench": "lowrank_heal", "model": "smollm2-135m (fp32)", "train_tokens": args.tokens,
              "svd": f"svd-llm, {args.target:.0%} fewer Linear parameters, {args.blocks} x 512 calibration",
              "batch": f"{args.batch} x 256", "lr": args.lr, "kd": "alpha 0.5, T 2, wiki.valid",
              "hidden_weight": args.hidden_weight, "threads": args.threads, "eval": "WikiText-2 test, window 512",
              "eval_tokens": args.eval_tokens,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__}  # fmt: skip
    results = ResultsFile(RESULTS / f"lowrank_heal{args.suffix}.json", header, merge=False)
    reference_rate = prefill_rate(teacher)
    factorized = copy_model(teacher)
    report, wall = apply("lowrank.svd", context(factorized, teacher, calib=calib),
                         {"method": "svd-llm", "target_params": args.target})  # fmt: skip
    label = f"svd-llm {args.target:.0%}"
    results.add(row(f"{label} (no training)", factorized, teacher, ids, args, reference_rate, summary=report.summary,
                    pass_s=round(wall, 1)))  # fmt: skip
    heal(label, factorized, teacher, ids, args, reference_rate, results)
    target = factorized.num_parameters()
    del factorized
    depth_rows(teacher, target, calib, ids, args, reference_rate, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=153600, help="KD training tokens per run (heal.py's depth row)")
    parser.add_argument("--target", type=float, default=0.4, help="fraction of Linear parameters svd-llm removes")
    parser.add_argument("--blocks", type=int, default=32, help="calibration blocks of 512 tokens")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="distill.kd hidden_weight (hidden_loss relative, each layer to the depth it stands for)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suffix", default="", help="results file lowrank_heal<suffix>.json")
    args = parser.parse_args()
    run_logged(run, args, RESULTS / f"lowrank_heal{args.suffix}.json")


if __name__ == "__main__":
    main()
