"""share.layers benchmark (issue 15): recursive layer sharing vs depth pruning at the same parameter count.

Claim under test (Bae et al. 2024, "Relaxed Recursive Transformers"): a pretrained model turned
into K unique blocks looped over its L depths, with a per-depth low-rank relaxation, then healed
with distillation, ends closer to the original than a depth-pruned model with as many parameters
healed with the same budget.

Protocol (../shared/BENCH.md, the healing bench's settings, bench/heal.py): SmolLM2-135M
(embedded, fp32) is the original and the teacher. share.layers: 30 layers -> 15 unique blocks x 2,
relaxation rank 16 (and `--ranks 16 64`), `--pattern repeat --init regmean` by default: the shared
blocks and deltas fitted to the depths' outputs on the same 32 calibration blocks of 512 from
wiki.valid that prune.depth uses (`--init average`, the paper's, starts about 3x farther: probed
on held-out wiki.valid before training, KL 10.8 against 4.0). prune.depth: block_influence on those blocks,
removing the fewest layers that bring it to at most the shared model's parameters. Both then get
distill.kd with the depth row's budget of bench/heal.py: `--tokens` (full run 153600 = 150 steps of
4 x 256) of WikiText-2 validation, alpha 0.5, T 2, lr 2e-4. Evaluation: the first `--eval-tokens`
(default 32768) tokens of WikiText-2 test, windows of 512: KL(original ‖ candidate), top-1
agreement, perplexity (and its ratio to the original's); parameters counted with each shared
tensor once; prefill speed as a ratio to the original measured in the same run (every depth of a
shared model still computes, plus its deltas).

    nice -n 10 .venv/bin/python bench/share_layers.py                      # the full run (alone)
    .venv/bin/python bench/share_layers.py --tokens 8192 --eval-tokens 4096 --suffix=-short
    .venv/bin/python bench/share_layers.py --tokens 38400 --eval-tokens 8192 --hidden-weight 1 --suffix=-38k-hidden
    .venv/bin/python bench/share_layers.py --report

`--hidden-weight W` adds distill.kd's relative hidden-state term (hidden_loss: relative) to both
healings, each student layer mapped to the teacher depth it stands for (every depth of the shared
model to itself, each kept layer of the depth-pruned one to its original index).
Writes bench/results/share_layers<suffix>.json (row by row) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heal  # noqa: E402
from heal import apply, calibration, context, copy_model, eval_ids, fmt, kd_values, quality  # noqa: E402
from results_file import ResultsFile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared beside the checkout; from a git worktree under <root>/wt/ it is <root>/shared
heal.DATA = next((p / "shared" / "data" / "wikitext2" for p in Path(__file__).resolve().parents[2:4]
                  if (p / "shared" / "data" / "wikitext2").is_dir()), heal.DATA)  # fmt: skip
COLUMNS = ("name", "parameters", "params_ratio", "tokens_seen", "train_s", "kl", "top1", "ppl", "ppl_ratio",
           "prefill_speed_ratio")  # fmt: skip


def prefill_rate(loaded, repeats: int = 3) -> float:
    """Prompt tokens/s of one 512-token window (batch 1), the best of `repeats` after a warm-up."""
    ids = torch.randint(100, 10000, (1, 512), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.no_grad():
        loaded.model(input_ids=ids)
        for _ in range(repeats):
            start = time.perf_counter()
            loaded.model(input_ids=ids)
            best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def row(name: str, loaded, teacher, ids, args, reference_rate: float, **extra) -> dict:
    q = quality(teacher, loaded, ids, args.eval_tokens)
    params = loaded.num_parameters()
    return {"name": name, "parameters": params, "params_ratio": params / teacher.num_parameters(), **extra, **q,
            "ppl_ratio": q["ppl"] / q["ppl_reference"], "prefill_speed_ratio": prefill_rate(loaded) / reference_rate}  # fmt: skip


def hidden_term(args, teacher, removed: list[int]) -> dict:
    """`--hidden-weight`: distill.kd's relative hidden-state term, each student layer mapped to the
    teacher layer it stands for: the teacher's layers less `removed` (0-based), in order."""
    from kompakt.model.arch import decoder_layers

    if not args.hidden_weight:
        return {}
    kept = [layer for layer in range(len(decoder_layers(teacher.model))) if layer not in removed]
    return {"hidden_weight": args.hidden_weight, "hidden_loss": "relative",
            "layer_map": [[i + 1, layer + 1] for i, layer in enumerate(kept)]}  # fmt: skip


def heal(label: str, student, teacher, ids, args, reference_rate: float, results: ResultsFile,
         removed: list[int] = ()) -> None:  # fmt: skip
    """distill.kd with the depth row's budget; `removed`: the teacher layers the student lacks."""
    values = {**kd_values(args, 0.5), **hidden_term(args, teacher, removed)}
    report, wall = apply("distill.kd", context(student, teacher), values)
    d = report.details
    results.add(row(f"{label} -> KD a=0.5 T=2", student, teacher, ids, args, reference_rate, tokens_seen=d.get("tokens"),
                    train_s=round(wall, 1), train_tokens_per_s=d.get("tokens_per_s"), loss_first=d.get("loss_first"),
                    loss_last=d.get("loss_last")))  # fmt: skip


def depth_count(teacher, target_params: int) -> int:
    """The fewest layers to remove so that the depth-pruned model has at most `target_params`."""
    from kompakt.model.arch import decoder_layers

    per_layer = sum(p.numel() for p in decoder_layers(teacher.model)[0].parameters())
    total, n = teacher.num_parameters(), 0
    while total - n * per_layer > target_params:
        n += 1
    return n


def run(args) -> None:
    from kompakt.model.load import load

    teacher = load("smollm2-135m", device="cpu", dtype="float32")
    ids = eval_ids(teacher.tokenizer)
    header = {"bench": "share_layers", "model": "smollm2-135m (fp32)", "train_tokens": args.tokens,
              "share": f"{args.unique} unique blocks, {args.pattern}, {args.init}",
              "batch": f"{args.batch} x 256", "lr": args.lr, "kd": "alpha 0.5, T 2, wiki.valid",
              "hidden_weight": args.hidden_weight,
              "threads": args.threads, "eval": "WikiText-2 test, window 512", "eval_tokens": args.eval_tokens,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__}  # fmt: skip
    results = ResultsFile(RESULTS / f"share_layers{args.suffix}.json", header, merge=args.merge)
    reference_rate = prefill_rate(teacher)
    calib = calibration(teacher.tokenizer, 32)
    smallest = None
    for rank in args.ranks:
        shared = copy_model(teacher)
        report, wall = apply("share.layers", context(shared, teacher, calib=calib),
                             {"unique": args.unique, "pattern": args.pattern, "init": args.init, "relax_rank": rank})  # fmt: skip
        label = f"share {args.unique} blocks {args.pattern} {args.init} r{rank}"
        results.add(row(f"{label} (no training)", shared, teacher, ids, args, reference_rate, summary=report.summary,
                        pass_s=round(wall, 1)))  # fmt: skip
        smallest = min(smallest or shared.num_parameters(), shared.num_parameters())
        heal(label, shared, teacher, ids, args, reference_rate, results)
        del shared
    depth_rows(teacher, smallest, calib, ids, args, reference_rate, results)


def depth_rows(teacher, target_params: int, calib, ids, args, reference_rate: float, results: ResultsFile) -> None:
    """The comparison both KD benches make (this one, bench/lowrank_heal.py): prune.depth by block
    influence to at most `target_params`, its row, then healed with the same budget."""
    pruned = copy_model(teacher)
    n = depth_count(teacher, target_params)
    report, wall = apply("prune.depth", context(pruned, teacher, calib=calib), {"count": n, "method": "block_influence"})
    label = f"depth -{n} layers"
    results.add(row(f"{label} (no training)", pruned, teacher, ids, args, reference_rate, summary=report.summary,
                    pass_s=round(wall, 1)))  # fmt: skip
    heal(label, pruned, teacher, ids, args, reference_rate, results, removed=report.details["removed_layers"])


def print_table(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"\n## {path.name}: KD {data['train_tokens']} tokens ({data['batch']}, lr {data['lr']}), "
          f"{data['threads']} threads, eval {data['eval_tokens']} tokens of {data['eval']}")  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in data["rows"]:
        print("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=153600, help="KD training tokens per run (heal.py's depth row)")
    parser.add_argument("--unique", type=int, default=15, help="unique blocks of the 30 layers")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16], help="relaxation ranks (one shared run each)")
    parser.add_argument("--pattern", default="repeat", help="share.layers pattern: cycle or repeat")
    parser.add_argument("--init", default="regmean", help="share.layers init: regmean, average or keep")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="distill.kd hidden_weight (hidden_loss relative, each layer to the depth it stands for)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suffix", default="", help="results file share_layers<suffix>.json")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an existing results file")
    parser.add_argument("--report", action="store_true", help="print the tables of the runs so far")
    args = parser.parse_args()
    if args.report:
        for path in sorted(RESULTS.glob("share_layers*.json")):
            print_table(path)
        return
    run_logged(run, args, RESULTS / f"share_layers{args.suffix}.json")


def run_logged(run_rows, args, path: Path) -> None:
    """Run a KD comparison (this bench's or bench/lowrank_heal.py's) with the training log on
    stdout, `args.threads` threads and seed 0, then print its table."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run_rows(args)
    print_table(path)


if __name__ == "__main__":
    main()
