"""Pruning benchmark (issue 3): sparsity (magnitude / Wanda / SparseGPT, 50 % and 2:4), depth and width.

Protocol (../shared/BENCH.md): SmolLM2-135M computed in fp32; calibration = 128 blocks of 512
tokens of WikiText-2 validation (" <unk>" removed) at positions drawn with
torch.randint(..., generator=Generator().manual_seed(0)); evaluation = the first 32768 tokens
of WikiText-2 test, windows of 512, stride 512. Wall time is the pass alone (no evaluation).

    .venv/bin/python bench/pruning.py                               # full protocol
    .venv/bin/python bench/pruning.py --calib-blocks 32 --tokens 8192 --only sparse --rows 2:4

Depth rows (25 % of the layers by block_influence / angular / kl / last) and width rows (~50 %
of the parameters, with bytes and prefill / generation tokens/s against the original in the
same run) appear when the passes `prune.depth` / `prune.width` are registered.
`--kl` adds KL to the original and top-1 agreement (one more forward of the original per row).

Peer side by side: `--peer /work/peers/llmc/bin/python` (the llm-compressor environment,
bench/peers/requirements-llmcompressor.txt) adds llm-compressor's SparseGPTModifier and
WandaPruningModifier at 50 % and 2:4, run in a subprocess on exactly these calibration blocks
with the same thread count, saved dense and scored by this evaluator; the end of the output
compares perplexity and wall time (ours / theirs).

Row groups can run in separate processes into one file: `--merge` keeps the rows other runs of
the same protocol wrote (the file is rewritten after every row), e.g.

    nice -n 10 .venv/bin/python bench/pruning.py --threads 1 --merge --only sparse
    nice -n 10 .venv/bin/python bench/pruning.py --threads 1 --merge --only depth --only width
    nice -n 10 .venv/bin/python bench/pruning.py --threads 1 --merge --only peer --peer /work/peers/llmc/bin/python

Prints a table and writes bench/results/pruning.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch

from results_file import ResultsFile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"

SPARSE_ROWS = [
    (f"{method} {label}", "prune.sparse", {"method": method, **pattern})
    for label, pattern in (("50%", {"sparsity": 0.5}), ("2:4", {"nm": "2:4"}))
    for method in ("magnitude", "wanda", "sparsegpt")
]
# kl runs one full forward per layer per block: 8 blocks (4096 tokens) instead of the pass's 32,
# or this one row would cost as much as the rest of the bench on a 2-core machine.
DEPTH_ROWS = [
    (f"depth 25% {method}", "prune.depth", {"fraction": 0.25, "method": method, **extra})
    for method, extra in (("block_influence", {}), ("angular", {}), ("kl", {"max_blocks": 8}), ("last", {}))
]
WIDTH_ROWS = [("width ~50% params", "prune.width", {"target_params": 0.5})]
# llm-compressor rows: (label, peer method, our row it compares with); run with --peer PYTHON
PEER_ROWS = [
    (f"llm-compressor {kind} {label}", f"{kind}-{pattern}", f"{kind} {label}")
    for label, pattern in (("50%", "50"), ("2:4", "2:4"))
    for kind in ("wanda", "sparsegpt")
]


def calibration_blocks(tokenizer, n_blocks: int, block_len: int = 512) -> torch.Tensor:
    from kompakt.data import sample_blocks, tokenize_texts

    text = (DATA / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", "")
    ids = tokenize_texts([text], tokenizer)
    return sample_blocks(ids, n_blocks, block_len, seed=0)


def evaluation_ids(tokenizer) -> torch.Tensor:
    from kompakt.data import read_texts, tokenize_texts

    return tokenize_texts(read_texts(DATA / "wiki.test.raw"), tokenizer)


def quality(reference, candidate, ids: torch.Tensor, tokens: int, with_kl: bool) -> dict:
    from kompakt.evaluate import fidelity, perplexity

    if with_kl:
        result = fidelity(reference, candidate, ids, window=512, stride=512, max_tokens=tokens)
        return {"ppl": result.ppl_candidate, "kl": result.kl_mean, "top1": result.top1}
    return {"ppl": perplexity(candidate, ids, window=512, stride=512, max_tokens=tokens).ppl}


def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of exact zeros among the decoder Linears' weights."""
    from kompakt.model.arch import arch_for, decoder_layers, linear_modules

    spec = arch_for(model)
    weights = [m.weight for layer in decoder_layers(model) for m in linear_modules(layer, spec).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_row(dense, name: str, values: dict, calib: torch.Tensor):
    """Apply one pass to a copy of the dense model; returns (pruned LoadedModel, wall seconds)."""
    from kompakt.passes.base import PassContext, build_config, get_pass

    spec = get_pass(name)
    config = build_config(spec, values)
    loaded = copy.deepcopy(dense)
    ctx = PassContext(loaded=loaded, original=lambda: dense, calibration=lambda: calib, seed=0)
    start = time.perf_counter()
    report = spec.apply(ctx, config)
    return report, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32768, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--calib-blocks", type=int, default=128, help="calibration blocks of 512 tokens")
    parser.add_argument("--only", choices=("sparse", "depth", "width", "peer"), action="append",
                        help="row groups to run (default: all; peer needs --peer)")
    parser.add_argument("--peer", help="python of the llm-compressor environment (bench/peers/): adds its rows")
    parser.add_argument("--kl", action="store_true", help="also KL to the original and top-1 agreement")
    parser.add_argument("--speed", action="store_true", help="tokens/s for every row (width rows always)")
    parser.add_argument("--rows", action="append", help="run only rows whose name contains this (repeatable)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pruning.json")
    parser.add_argument("--merge", action="store_true", help="keep the other rows already in --out (same protocol)")
    args = parser.parse_args()

    from kompakt.evaluate import measure_speed, parameter_bytes, parameter_count
    from kompakt.model.load import load
    from kompakt.passes.base import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    dense = load(args.model)
    calib = calibration_blocks(dense.tokenizer, args.calib_blocks)
    ids = evaluation_ids(dense.tokenizer)
    groups = set(args.only or ("sparse", "depth", "width", "peer"))
    available = registry()
    plan = [row for group, rows in (("sparse", SPARSE_ROWS), ("depth", DEPTH_ROWS), ("width", WIDTH_ROWS))
            if group in groups for row in rows if row[1] in available
            and (not args.rows or any(part in row[0] for part in args.rows))]  # fmt: skip

    dense_speed = measure_speed(dense) if args.speed else None
    results = ResultsFile(args.out, header(args), args.merge)
    base = results.previous_row("dense") if args.merge else None  # the same protocol: no need to re-measure
    if base is None or (dense_speed and "prefill_tps" not in base):
        base = {"name": "dense", "pass": None, "seconds": 0.0, "params": parameter_count(dense.model),
                "bytes": parameter_bytes(dense.model), "zeros": zero_fraction(dense.model),
                **quality(dense, dense, ids, args.tokens, False)}  # fmt: skip
    if dense_speed:
        base.update(prefill_tps=dense_speed.prefill_tokens_per_s, generate_tps=dense_speed.generate_tokens_per_s)
    rows = [base]
    results.add({**base, "order": 0})
    print_table(rows, header=True)
    order = {row[0]: i for i, row in enumerate(SPARSE_ROWS + DEPTH_ROWS + WIDTH_ROWS, start=1)}
    for label, name, values in plan:
        report, seconds = run_row(dense, name, values, calib)
        model = report.loaded
        row = {"name": label, "pass": name, "config": values, "seconds": seconds,
               "params": parameter_count(model.model), "bytes": parameter_bytes(model.model),
               "zeros": zero_fraction(model.model), **quality(dense, model, ids, args.tokens, args.kl),
               "summary": report.summary}  # fmt: skip
        if name == "prune.width":
            row.update(paired_speed(dense, model))
        elif args.speed:
            speed = measure_speed(model)
            row.update(prefill_tps=speed.prefill_tokens_per_s, generate_tps=speed.generate_tokens_per_s)
        row["machine"] = machine()
        rows.append(row)
        results.add({**row, "order": order[label]})
        print_table([row])
        del model, report
    if args.peer and "peer" in groups:
        run_peers(args, dense, calib, ids, results)
    print(f"\nwrote {args.out}")
    print_comparison(results.read())


def run_peers(args, dense, calib: torch.Tensor, ids: torch.Tensor, results: ResultsFile) -> None:
    """llm-compressor's SparseGPT / Wanda on the same blocks, scored by the same evaluator."""
    from peer_llmc import run_peer

    from kompakt.evaluate import parameter_bytes, parameter_count

    for order, (label, method, _) in enumerate(PEER_ROWS, start=100):
        if args.rows and not any(part in label for part in args.rows):
            continue
        try:
            model, info = run_peer(args.peer, method, dense, calib, threads=torch.get_num_threads())
        except RuntimeError as error:
            print(f"{label}: {error}", flush=True)
            results.add({"name": label, "error": str(error), "order": order})
            continue
        row = {"name": label, "pass": f"llmcompressor {method}", "seconds": info["seconds"], "peer": info,
               "params": parameter_count(model.model), "bytes": parameter_bytes(model.model), "zeros": zero_fraction(model.model),
               **quality(dense, model, ids, args.tokens, args.kl), "machine": machine(), "order": order}  # fmt: skip
        results.add(row)
        print_table([row])
        del model


def print_comparison(data: dict) -> None:
    """Ours vs llm-compressor, from the merged result file: ppl ratio and wall-time ratio."""
    rows = {r["name"]: r for r in data.get("rows", [])}
    lines = []
    for label, _, ours in PEER_ROWS:
        theirs, mine = rows.get(label), rows.get(ours)
        if theirs and mine and "ppl" in theirs and "ppl" in mine:
            lines.append(f"{ours:<16} ours {mine['ppl']:8.2f}  llm-compressor {theirs['ppl']:8.2f}  "
                         f"ppl ours/theirs {mine['ppl'] / theirs['ppl']:.3f}  "
                         f"time ours/theirs {mine['seconds'] / theirs['seconds']:.2f} "
                         f"({mine['seconds']:.0f} s vs {theirs['seconds']:.0f} s)")  # fmt: skip
    if lines:
        print("\nside by side (same blocks, same evaluator, same threads):")
        print("\n".join(lines))


def paired_speed(dense, model, rounds: int = 3) -> dict:
    """Prefill / generation tokens/s of `model` and of the original, measured alternately `rounds`
    times in this process, best of each: on a shared machine the other processes' load hits both
    sides alike, and the best round is the closest to an idle machine."""
    from kompakt.evaluate import measure_speed

    best = {"model": [0.0, 0.0], "dense": [0.0, 0.0]}
    for _ in range(rounds):
        for key, loaded in (("dense", dense), ("model", model)):
            speed = measure_speed(loaded)
            best[key] = [max(best[key][0], speed.prefill_tokens_per_s), max(best[key][1], speed.generate_tokens_per_s)]
    (prefill, generate), (ref_prefill, ref_generate) = best["model"], best["dense"]
    return {"prefill_tps": prefill, "generate_tps": generate, "dense_prefill_tps": ref_prefill,
            "dense_generate_tps": ref_generate, "prefill_speedup": prefill / ref_prefill,
            "generate_speedup": generate / ref_generate, "speed_rounds": rounds}  # fmt: skip


def header(args) -> dict:
    return {
        "protocol": {"model": args.model, "calibration": f"{args.calib_blocks}x512 wiki.valid (seed 0)",
                     "evaluation": f"first {args.tokens} tokens of wiki.test.raw, window 512, stride 512"},
        "machine": machine(),
    }  # fmt: skip


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")  # fmt: skip


def print_table(rows: list[dict], header: bool = False) -> None:
    dense_ppl = getattr(print_table, "dense_ppl", None)
    if header:
        print(f"{'candidate':<26} {'ppl':>8} {'ratio':>6} {'KL':>7} {'top1':>6} {'zeros':>6} {'params':>7} "
              f"{'MB':>6} {'prefill':>8} {'gen':>6} {'time s':>7}")  # fmt: skip
        print_table.dense_ppl = dense_ppl = rows[0]["ppl"]  # type: ignore[attr-defined]
    for r in rows:
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        top1 = f"{r['top1']:.1%}" if "top1" in r else "-"
        prefill = f"{r['prefill_tps']:.0f}" if "prefill_tps" in r else "-"
        gen = f"{r['generate_tps']:.1f}" if "generate_tps" in r else "-"
        print(f"{r['name']:<26} {r['ppl']:>8.2f} {r['ppl'] / dense_ppl:>6.3f} {kl:>7} {top1:>6} {r['zeros']:>6.1%} "
              f"{r['params'] / 1e6:>6.1f}M {r['bytes'] / 1e6:>6.0f} {prefill:>8} {gen:>6} {r['seconds']:>7.1f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
