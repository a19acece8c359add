"""Low-rank benchmark (issue 15): lowrank.svd plain / asvd / svd-llm at 20 % and 40 % fewer Linear parameters.

Protocol (../shared/BENCH.md): SmolLM2-135M computed in fp32; calibration = 128 blocks of 512
tokens of WikiText-2 validation (" <unk>" removed, positions from seed 0); evaluation = the first
32768 tokens of WikiText-2 test, windows of 512, stride 512; KL(original || candidate) and top-1
agreement on the same windows. "Linear parameters" are those of the decoder Linears (embedding
and lm_head excluded). No training. Wall time is the pass alone (no evaluation).

    .venv/bin/python bench/lowrank.py                                 # full protocol
    OMP_NUM_THREADS=1 .venv/bin/python bench/lowrank.py --threads 1 --blocks 32 --eval-tokens 8192 --data DIR
    .venv/bin/python bench/lowrank.py --merge --rows svd-llm          # some rows, kept beside the others

`--speed` adds prefill / generation tokens/s as ratios to the original measured in the same run
(a factorized Linear does two matmuls). A row is (label, pass, config); share.basis has its rows beside lowrank.svd's.
The issue's goals are checked at the end: svd-llm < asvd < plain in perplexity at both budgets,
share.basis below svd-llm at both, and svd-llm at 20 % within 1.5x the original's perplexity.
Prints a table and writes bench/results/lowrank.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pruning
from pruning import calibration_blocks, evaluation_ids, machine, paired_speed, quality, run_row
from results_file import ResultsFile

REPO = Path(__file__).resolve().parents[1]
TARGETS = (0.2, 0.4)
METHODS = ("plain", "asvd", "svd-llm")
ROWS = [(f"{method} {target:.0%}", "lowrank.svd", {"method": method, "target_params": target})
        for target in TARGETS for method in METHODS]  # fmt: skip
ROWS += [(f"share.basis {target:.0%}", "share.basis", {"target_params": target}) for target in TARGETS]


def linear_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder Linears (factors included, a basis shared by several layers once),
    the budget `target_params` is a share of."""
    from kompakt.model.arch import arch_for, decoder_layers, linear_modules

    spec = arch_for(model)
    weights = {id(m.weight): m.weight for layer in decoder_layers(model) for m in linear_modules(layer, spec).values()}
    return sum(w.numel() for w in weights.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=pruning.DATA, help="directory of wiki.valid.tokens / wiki.test.raw")
    parser.add_argument("--blocks", type=int, default=128, help="calibration blocks of 512 tokens")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--rows", action="append", help="run only rows whose name contains this (repeatable)")
    parser.add_argument("--speed", action="store_true",
                        help="prefill / generation tokens/s against the original, measured alternately in this run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lowrank.json")
    parser.add_argument("--merge", action="store_true", help="keep the other rows already in --out (same protocol)")
    args = parser.parse_args()

    from kompakt.evaluate import parameter_count
    from kompakt.model.load import load

    if args.threads:
        torch.set_num_threads(args.threads)
    pruning.DATA = args.data  # the shared data helpers read it (a worktree has no ../shared beside it)
    dense = load(args.model, dtype="float32")
    calib = calibration_blocks(dense.tokenizer, args.blocks)
    ids = evaluation_ids(dense.tokenizer)
    results = ResultsFile(args.out, header(args), args.merge)
    base = results.previous_row("dense") if args.merge else None
    if base is None:
        base = {"name": "dense", "pass": None, "seconds": 0.0, "params": parameter_count(dense.model),
                "linear_params": linear_params(dense.model), **quality(dense, dense, ids, args.eval_tokens, False)}  # fmt: skip
    results.add({**base, "order": 0})
    print_row(base, base, header=True)
    for order, (label, name, values) in enumerate(ROWS, start=1):
        if args.rows and not any(part in label for part in args.rows):
            continue
        report, seconds = run_row(dense, name, values, calib)
        model = report.loaded.model
        row = {"name": label, "pass": name, "config": values, "seconds": seconds, "params": parameter_count(model),
               "linear_params": linear_params(model), **quality(dense, report.loaded, ids, args.eval_tokens, True),
               "summary": report.summary, "details": report.details, "machine": machine(), "order": order}  # fmt: skip
        if args.speed:  # two matmuls per factorized Linear: faster only well below break-even
            row.update(paired_speed(dense, report.loaded))
        results.add(row)
        print_row(row, base)
        del model, report
    print(f"\nwrote {args.out}")
    print_goals(results.read(), base)


def print_row(row: dict, base: dict, header: bool = False) -> None:
    if header:
        print(f"{'candidate':<14} {'ppl':>8} {'ratio':>6} {'KL':>7} {'top1':>6} {'Linear':>7} {'removed':>7} "
              f"{'params':>7} {'time s':>7}")  # fmt: skip
    kl = f"{row['kl']:.4f}" if "kl" in row else "-"
    top1 = f"{row['top1']:.1%}" if "top1" in row else "-"
    removed = 1 - row["linear_params"] / base["linear_params"]
    speed = f" prefill x{row['prefill_speedup']:.2f} gen x{row['generate_speedup']:.2f}" if "prefill_speedup" in row else ""
    print(f"{row['name']:<14} {row['ppl']:>8.2f} {row['ppl'] / base['ppl']:>6.3f} {kl:>7} {top1:>6} "
          f"{row['linear_params'] / 1e6:>6.1f}M {removed:>7.1%} {row['params'] / 1e6:>6.1f}M {row['seconds']:>7.1f}{speed}",
          flush=True)  # fmt: skip


def print_goals(data: dict, base: dict) -> None:
    """The issue's goals, from the (merged) result file."""
    rows = {r["name"]: r for r in data.get("rows", [])}
    for target in TARGETS:
        ppl = [rows.get(f"{m} {target:.0%}", {}).get("ppl") for m in METHODS]
        if all(ppl):
            order = "yes" if ppl[2] < ppl[1] < ppl[0] else "no"
            print(f"{target:.0%}: svd-llm < asvd < plain in perplexity: {order} "
                  f"({ppl[2]:.2f} / {ppl[1]:.2f} / {ppl[0]:.2f})")  # fmt: skip
    for target in TARGETS:
        shared, single = rows.get(f"share.basis {target:.0%}"), rows.get(f"svd-llm {target:.0%}")
        if shared and single:
            beats = "yes" if shared["ppl"] < single["ppl"] else "no"
            print(f"{target:.0%}: share.basis beats svd-llm in perplexity: {beats} ({shared['ppl']:.2f} vs "
                  f"{single['ppl']:.2f}; KL {shared.get('kl', float('nan')):.4f} vs {single.get('kl', float('nan')):.4f})")
    goal = rows.get("svd-llm 20%")
    if goal:
        ratio = goal["ppl"] / base["ppl"]
        print(f"svd-llm 20% within 1.5x the original's perplexity: {'yes' if ratio <= 1.5 else 'no'} ({ratio:.3f}x)")


def header(args) -> dict:
    return {
        "protocol": {"model": args.model, "calibration": f"{args.blocks}x512 wiki.valid (seed 0)",
                     "evaluation": f"first {args.eval_tokens} tokens of wiki.test.raw, window 512, stride 512"},
        "machine": machine(),
    }  # fmt: skip


if __name__ == "__main__":
    main()
