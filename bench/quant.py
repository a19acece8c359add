"""Quantization benchmark (issue 4): RTN, GPTQ and AWQ + GPTQ on int grids and llama.cpp's q4_0 grid.

Protocol (../shared/BENCH.md): SmolLM2-135M computed in fp32; calibration = 128 blocks of 512
tokens of WikiText-2 validation (" <unk>" removed) at positions drawn with
torch.randint(..., generator=Generator().manual_seed(0)); evaluation = the first 32768 tokens
of WikiText-2 test, windows of 512, stride 512; KL(original ‖ candidate) and top-1 agreement on
the same windows. Wall time is the quantization alone (AWQ + GPTQ: both steps), with
`--threads` intra-op threads (default 1: on the shared 2-core box more threads are slower).

    .venv/bin/python bench/quant.py                                  # full protocol
    .venv/bin/python bench/quant.py --tokens 8192 --calib-blocks 32  # reduced
    .venv/bin/python bench/quant.py --only "GPTQ W4 g64 sym"         # one row (+ original)

Caveat that shapes every 4-bit number: the embedded original is itself dequantized from Q4_1
(asymmetric, 32-weight blocks), so asymmetric 4-bit grids with 32-weight blocks can re-find its
values almost exactly and look unrealistically good. All 4-bit rows here are symmetric grids
(int4 g64 symmetric, q4_0). Anchors (BENCH.md, same protocol, 32k tokens): original 29.53;
RTN W4 g64 sym 41.05; llm-compressor 0.14 GPTQ W4 g64 sym 37.90 in 503 s.

    --peer /work/peers/llmc/bin/python   llm-compressor's GPTQModifier (W4 g64 sym) side by side:
                                         its own environment (it pins transformers <= 5.17), a
                                         subprocess on these blocks and threads, saved dense,
                                         scored here (bench/peer_llmc.py, bench/peers/)
    --gguf                               kompakt Q4_0 vs llama.cpp's quantizer Q4_0 at the same
                                         size, 16k tokens, + llama.cpp tokens/s (bench/gguf_compare.py;
                                         needs the "AWQ+GPTQ q4_0" row's saved model, --keep-dir)

Rows can run in separate processes into one file with `--merge` (see bench/results_file.py).

Prints a table and writes bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from results_file import ResultsFile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"

W4 = {"bits": 4, "group_size": 64, "symmetric": True}
W3 = {"bits": 3, "group_size": 64, "symmetric": True}
Q40 = {"format": "q4_0"}
# (label, [(pass, config), ...]) — a row runs its steps in order on a copy of the original
ROWS = [  # the rows the goals need first, the rest after
    ("RTN W4 g64 sym", [("quant.rtn", W4)]),
    ("GPTQ W4 g64 sym", [("quant.gptq", W4)]),
    ("RTN W3 g64 sym", [("quant.rtn", W3)]),
    ("GPTQ W3 g64 sym", [("quant.gptq", W3)]),
    ("RTN q4_0 (= llama.cpp Q4_0 rounding)", [("quant.rtn", Q40)]),
    ("GPTQ q4_0", [("quant.gptq", Q40)]),
    ("AWQ+GPTQ q4_0", [("quant.awq", Q40), ("quant.gptq", Q40)]),
    ("AWQ+GPTQ q4_0 one run", [("quant.gptq", {**Q40, "awq": True})]),
    ("AWQ+GPTQ W4 g64 sym", [("quant.awq", W4), ("quant.gptq", W4)]),
    ("AWQ+GPTQ W4 g64 sym one run", [("quant.gptq", {**W4, "awq": True})]),
    ("AWQ+RTN W4 g64 sym", [("quant.awq", W4), ("quant.rtn", W4)]),
]
KEEP = "AWQ+GPTQ q4_0"
KEEP_DIR = Path.home() / ".cache" / "kompakt" / "bench" / "awq-gptq-q4_0"  # saved (--keep-dir) for the GGUF comparison (bench/gguf_compare.py)
ANCHORS = {"RTN W4 g64 sym": 41.05, "llm-compressor GPTQ W4 g64 sym": 37.90, "original": 29.53}


def calibration_blocks(tokenizer, n_blocks: int, block_len: int = 512, data: Path = DATA) -> torch.Tensor:
    from kompakt.data import sample_blocks, tokenize_texts

    text = (data / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", "")
    ids = tokenize_texts([text], tokenizer)
    return sample_blocks(ids, n_blocks, block_len, seed=0)


def evaluation_ids(tokenizer, data: Path = DATA) -> torch.Tensor:
    from kompakt.data import tokenize_texts

    return tokenize_texts([(data / "wiki.test.raw").read_text(encoding="utf-8")], tokenizer)


def run_steps(original, steps, calib: torch.Tensor, done: dict):
    """Apply the row's passes to a copy of the original; (LoadedModel, summaries, wall s, CPU s).

    `done` caches the model after each step prefix (AWQ + GPTQ and AWQ + RTN share the AWQ step;
    its time is counted in both rows). CPU seconds are reported beside wall time because on a
    shared machine wall time mostly measures the other processes."""
    from kompakt.passes.base import PassContext, build_config, get_pass

    loaded, summaries, seconds, cpu = original, [], 0.0, 0.0
    for index, (name, values) in enumerate(steps):
        key = json.dumps(steps[: index + 1], sort_keys=True)
        if key in done:
            loaded, summary, step_s, step_cpu = done[key]
        else:
            spec = get_pass(name)
            work = copy.deepcopy(loaded)
            ctx = PassContext(loaded=work, original=lambda: original, calibration=lambda: calib, seed=0)
            start, start_cpu = time.perf_counter(), time.process_time()
            report = spec.apply(ctx, build_config(spec, dict(values)))
            step_s, step_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            loaded, summary = report.loaded, report.summary
            if index < len(steps) - 1:  # only prefixes can be shared
                done[key] = (loaded, summary, step_s, step_cpu)
        seconds, cpu = seconds + step_s, cpu + step_cpu
        summaries.append(summary)
    return copy.deepcopy(loaded) if loaded is original else loaded, summaries, seconds, cpu


def print_row(row: dict, base_ppl: float, header: bool = False) -> None:
    if header:
        print(f"{'candidate':38} {'ppl':>8} {'ratio':>6} {'KL':>7} {'top-1':>7} {'quant s':>8} {'cpu s':>7}")
    kl = f"{row['kl']:.4f}" if row.get("kl") is not None else "-"
    top1 = f"{row['top1']:.1%}" if row.get("top1") is not None else "-"
    print(f"{row['name']:38} {row['ppl']:8.2f} {row['ppl'] / base_ppl:6.3f} {kl:>7} {top1:>7} {row['seconds']:8.1f} {row.get('cpu_seconds', 0):7.1f}",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32768, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--calib-blocks", type=int, default=128, help="calibration blocks of 512 tokens")
    parser.add_argument("--only", action="append", help="row label to run (repeatable); default all")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data", type=Path, default=DATA, help="the WikiText-2 directory (default ../shared/data/wikitext2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant.json")
    parser.add_argument("--merge", action="store_true", help="keep the other rows already in --out (same protocol)")
    parser.add_argument("--keep-dir", type=Path, default=KEEP_DIR, help=f"where the {KEEP} model is saved")
    parser.add_argument("--peer", help="python of the llm-compressor environment (bench/peers/): adds its GPTQ row")
    parser.add_argument("--gguf", action="store_true", help=f"GGUF Q4_0 comparison (needs the saved {KEEP} model)")
    parser.add_argument("--gguf-tokens", type=int, default=16384, help="evaluation tokens of the GGUF comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kompakt.evaluate import fidelity, perplexity
    from kompakt.model.load import load

    original = load(args.model)
    calib = calibration_blocks(original.tokenizer, args.calib_blocks, data=args.data)
    ids = evaluation_ids(original.tokenizer, data=args.data)
    start = time.perf_counter()
    results = ResultsFile(args.out, header(args), args.merge)
    base = results.previous_row("original fp32") if args.merge else None  # same protocol: reuse
    if base is None:
        base_ppl = perplexity(original, ids, window=512, stride=512, max_tokens=args.tokens).ppl
        base = {"name": "original fp32", "ppl": base_ppl, "kl": 0.0, "top1": 1.0, "seconds": 0.0,
                "cpu_seconds": 0.0, "eval_seconds": time.perf_counter() - start}  # fmt: skip
    base_ppl = base["ppl"]
    results.add({**base, "order": 0})
    print_row(base, base_ppl, header=True)
    done: dict = {}
    for order, (label, steps) in enumerate(ROWS, start=1):
        if (args.only and label not in args.only) or (args.only is None and (args.peer or args.gguf)):
            continue
        model, summaries, seconds, cpu = run_steps(original, steps, calib, done)
        if label == KEEP:
            from kompakt.model.save import save_model

            save_model(model, args.keep_dir)
        start = time.perf_counter()
        fid = fidelity(original, model, ids, window=512, stride=512, max_tokens=args.tokens)
        row = {"name": label, "steps": [[n, v] for n, v in steps], "ppl": fid.ppl_candidate, "kl": fid.kl_mean,
               "kl_p99": fid.kl_p99, "top1": fid.top1, "seconds": seconds, "cpu_seconds": cpu,
               "eval_seconds": time.perf_counter() - start, "summaries": summaries, "machine": machine(),
               "order": order}  # fmt: skip
        results.add(row)
        print_row(row, base_ppl)
        del model
    if args.peer:
        run_peer_row(args, original, calib, ids, results, base_ppl)
    if args.gguf:
        run_gguf(args, original, ids, results)
    print(f"\nwrote {args.out}")
    print_comparison(results.read())


PEER_LABEL = "llm-compressor GPTQ W4 g64 sym"


def run_peer_row(args, original, calib: torch.Tensor, ids: torch.Tensor, results, base_ppl: float) -> None:
    """llm-compressor's GPTQModifier on the same blocks and threads, scored by the same evaluator."""
    from peer_llmc import run_peer

    from kompakt.evaluate import fidelity

    try:
        model, info = run_peer(args.peer, "gptq-w4g64", original, calib, threads=args.threads)
    except RuntimeError as error:
        print(f"{PEER_LABEL}: {error}", flush=True)
        results.add({"name": PEER_LABEL, "error": str(error), "order": 150})
        return
    fid = fidelity(original, model, ids, window=512, stride=512, max_tokens=args.tokens)
    row = {"name": PEER_LABEL, "ppl": fid.ppl_candidate, "kl": fid.kl_mean, "kl_p99": fid.kl_p99, "top1": fid.top1,
           "seconds": info["seconds"], "cpu_seconds": info["cpu_seconds"], "peer": info, "machine": machine(),
           "order": 150}  # fmt: skip
    results.add(row)
    print_row(row, base_ppl)


def run_gguf(args, original, ids: torch.Tensor, results) -> None:
    from gguf_compare import compare

    if not (args.keep_dir / "config.json").is_file():
        raise SystemExit(f"{args.keep_dir} has no model: run the {KEEP!r} row first (--only {KEEP!r})")
    rows = compare(original, args.keep_dir, ids, args.keep_dir.parent / "gguf", tokens=args.gguf_tokens,
                   threads=args.threads)  # fmt: skip
    for order, row in enumerate(rows, start=200):
        results.add({**row, "order": order, "seconds": row.get("quantize_seconds", 0.0), "machine": machine()})
        print(f"{row['name']:52} ppl {row['ppl']:7.2f}  KL {row['kl']:.4f}  top-1 {row['top1']:.1%}  "
              f"{row['file_bytes'] / 1e6:6.1f} MB  llama.cpp gen {row['gen_tps']:.1f} tok/s", flush=True)  # fmt: skip


def print_comparison(data: dict) -> None:
    """The issue's comparisons from the merged result file."""
    rows = {r["name"]: r for r in data.get("rows", []) if "ppl" in r}
    base = rows.get("original fp32")
    pairs = [("GPTQ W4 g64 sym", PEER_LABEL), ("AWQ+GPTQ W4 g64 sym", PEER_LABEL),
             ("GGUF kompakt Q4_0 (AWQ+GPTQ on the q4_0 grid)", "GGUF llama.cpp Q4_0 (llama_model_quantize from F16)")]
    print("\ncomparisons (same model, data, evaluator and threads):")
    for ours, theirs in pairs:
        a, b = rows.get(ours), rows.get(theirs)
        if not (a and b):
            continue
        line = f"  {ours} vs {theirs}: ppl {a['ppl']:.2f} vs {b['ppl']:.2f} (ratio {a['ppl'] / b['ppl']:.3f})"
        if a.get("kl") is not None and b.get("kl"):
            line += f", KL {a['kl']:.4f} vs {b['kl']:.4f} (ratio {a['kl'] / b['kl']:.2f})"
        if a.get("seconds") and b.get("seconds") and "GGUF" not in ours:
            line += f", time ours/theirs {a['seconds'] / b['seconds']:.2f} ({a['seconds']:.0f} s vs {b['seconds']:.0f} s)"
        print(line)
    if base:
        for name, row in rows.items():
            if name != "original fp32" and "GGUF" not in name:
                print(f"  {name}: ppl ratio to original {row['ppl'] / base['ppl']:.3f}")


def header(args) -> dict:
    return {
        "protocol": {"model": args.model, "calibration": f"{args.calib_blocks}x512 wiki.valid (seed 0)",
                     "evaluation": f"first {args.tokens} tokens of wiki.test.raw, window 512, stride 512",
                     "note": "4-bit rows on symmetric grids only (the original is dequantized from Q4_1)"},
        "machine": machine(),
        "anchors_32k": ANCHORS,
    }  # fmt: skip


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
