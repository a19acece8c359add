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
Not here yet: llm-compressor run side by side in the same process (it pins transformers <= 5.17).

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

from kompakt.model.cache import atomic_file

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"

W4 = {"bits": 4, "group_size": 64, "symmetric": True}
W3 = {"bits": 3, "group_size": 64, "symmetric": True}
Q40 = {"format": "q4_0"}
# (label, [(pass, config), ...]) — a row runs its steps in order on a copy of the original
ROWS = [
    ("RTN W4 g64 sym", [("quant.rtn", W4)]),
    ("GPTQ W4 g64 sym", [("quant.gptq", W4)]),
    ("AWQ+RTN W4 g64 sym", [("quant.awq", W4), ("quant.rtn", W4)]),
    ("AWQ+GPTQ W4 g64 sym", [("quant.awq", W4), ("quant.gptq", W4)]),
    ("RTN W3 g64 sym", [("quant.rtn", W3)]),
    ("GPTQ W3 g64 sym", [("quant.gptq", W3)]),
    ("RTN q4_0 (= llama.cpp Q4_0 rounding)", [("quant.rtn", Q40)]),
    ("GPTQ q4_0", [("quant.gptq", Q40)]),
    ("AWQ+GPTQ q4_0", [("quant.awq", Q40), ("quant.gptq", Q40)]),
]
ANCHORS = {"RTN W4 g64 sym": 41.05, "llm-compressor GPTQ W4 g64 sym": 37.90, "original": 29.53}


def calibration_blocks(tokenizer, n_blocks: int, block_len: int = 512) -> torch.Tensor:
    from kompakt.data import sample_blocks, tokenize_texts

    text = (DATA / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", "")
    ids = tokenize_texts([text], tokenizer)
    return sample_blocks(ids, n_blocks, block_len, seed=0)


def evaluation_ids(tokenizer) -> torch.Tensor:
    from kompakt.data import tokenize_texts

    return tokenize_texts([(DATA / "wiki.test.raw").read_text(encoding="utf-8")], tokenizer)


def run_steps(original, steps, calib: torch.Tensor):
    """Apply the row's passes to a copy of the original; (LoadedModel, summaries, wall s, CPU s).

    CPU seconds are reported beside wall time because on a shared machine wall time mostly
    measures the other processes."""
    from kompakt.passes.base import PassContext, build_config, get_pass

    loaded = copy.deepcopy(original)
    summaries, seconds, cpu = [], 0.0, 0.0
    for name, values in steps:
        spec = get_pass(name)
        ctx = PassContext(loaded=loaded, original=lambda: original, calibration=lambda: calib, seed=0)
        start, start_cpu = time.perf_counter(), time.process_time()
        report = spec.apply(ctx, build_config(spec, dict(values)))
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        loaded = report.loaded
        summaries.append(report.summary)
    return loaded, summaries, seconds, cpu


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
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kompakt.evaluate import fidelity, perplexity
    from kompakt.model.load import load

    original = load(args.model)
    calib = calibration_blocks(original.tokenizer, args.calib_blocks)
    ids = evaluation_ids(original.tokenizer)
    start = time.perf_counter()
    base_ppl = perplexity(original, ids, window=512, stride=512, max_tokens=args.tokens).ppl
    base = {"name": "original fp32", "ppl": base_ppl, "kl": 0.0, "top1": 1.0, "seconds": 0.0, "cpu_seconds": 0.0,
            "eval_seconds": time.perf_counter() - start}  # fmt: skip
    rows = [base]
    print_row(base, base_ppl, header=True)
    for label, steps in ROWS:
        if args.only and label not in args.only:
            continue
        model, summaries, seconds, cpu = run_steps(original, steps, calib)
        start = time.perf_counter()
        fid = fidelity(original, model, ids, window=512, stride=512, max_tokens=args.tokens)
        row = {"name": label, "steps": [[n, v] for n, v in steps], "ppl": fid.ppl_candidate, "kl": fid.kl_mean,
               "kl_p99": fid.kl_p99, "top1": fid.top1, "seconds": seconds, "cpu_seconds": cpu,
               "eval_seconds": time.perf_counter() - start, "summaries": summaries}  # fmt: skip
        rows.append(row)
        print_row(row, base_ppl)
        del model
    result = {
        "protocol": {"model": args.model, "calibration": f"{args.calib_blocks}x512 wiki.valid (seed 0)",
                     "evaluation": f"first {args.tokens} tokens of wiki.test.raw, window 512, stride 512",
                     "note": "4-bit rows on symmetric grids only (the original is dequantized from Q4_1)"},
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}",
        "anchors_32k": ANCHORS,
        "peer": "llm-compressor not run side by side here (anchor 37.90 / 503 s from BENCH.md)",
        "rows": rows,
    }  # fmt: skip
    with atomic_file(args.out) as tmp:  # never a half-written result
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
