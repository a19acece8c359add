"""Streaming GGUF export and streaming evaluation vs the in-memory paths (issue 14): peak RSS
(VmHWM of a fresh process), wall time, and whether the results are equal.

Each case runs in its own interpreter, so one path's memory never counts against the other:

- export: `kompakt.export.export(model, format="gguf", type=..., verify=False)` (streams a
  directory) vs `write_gguf(kompakt.load(model), ...)` (the whole model in fp32 first); the two
  files are compared byte for byte.
- perplexity: `evaluate.streamed.streamed_perplexity(open_lazy(dir), ...)` vs `perplexity(load(dir))`
  on the first --tokens tokens of WikiText-2 test (BENCH.md windows of 512).

    .venv/bin/python bench/streaming.py [--model smollm2-135m] [--type q4_0] [--tokens 4096] [--threads 2]

Prints a table and writes bench/results/streaming-<model>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"

_PRELUDE = """
import json, sys, time, torch
from pathlib import Path
from kompakt.process_memory import high_water_mark, reset_high_water_mark
torch.set_num_threads(int(sys.argv[1]))
model, out, kind, tokens = sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
from kompakt.model.load import resolve_model, load
directory, _ = resolve_model(model)
import kompakt.export.gguf, kompakt.evaluate.streamed  # imports before the counter restarts
reset_high_water_mark()
base = high_water_mark()
start = time.perf_counter()
"""
_CASES = {
    "export-streamed": """
from kompakt.export.api import export
export(model, format="gguf", type=kind, out=out, verify=False, force=True)
value = None
""",
    "export-in-memory": """
from kompakt.export.gguf import write_gguf
write_gguf(load(model, device="cpu", dtype="float32"), out, type=kind, force=True)
value = None
""",
    "ppl-streamed": """
from kompakt.data import load_tokens
from kompakt.evaluate.streamed import streamed_perplexity
from kompakt.model.lazy import open_lazy
lazy = open_lazy(directory, name=model)
ids = load_tokens(str(out), lazy.loaded(), n_tokens=tokens)
value = streamed_perplexity(lazy, ids, window=512).ppl
""",
    "ppl-in-memory": """
from kompakt.data import load_tokens
from kompakt.evaluate.perplexity import perplexity
loaded = load(model, device="cpu", dtype="float32")
ids = load_tokens(str(out), loaded, n_tokens=tokens)
value = perplexity(loaded, ids, window=512).ppl
""",
}
_REPORT = """
print(json.dumps({"wall_s": time.perf_counter() - start, "peak_rss": high_water_mark(), "base_rss": base,
                  "value": value}))
"""


def run_case(case: str, model: str, out: str, kind: str, tokens: int, threads: int) -> dict:
    code = _PRELUDE + _CASES[case] + _REPORT
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code, str(threads), model, out, kind, str(tokens)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--type", default="q4_0")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ppl", action="store_true")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("export-streamed", "export-in-memory"):
            rows[case] = run_case(case, args.model, f"{tmp}/{case}.gguf", args.type, 0, args.threads)
        digests = {c: hashlib.sha256(Path(f"{tmp}/{c}.gguf").read_bytes()).hexdigest() for c in rows}
    identical = len(set(digests.values())) == 1
    if not args.skip_ppl:
        for case in ("ppl-streamed", "ppl-in-memory"):
            rows[case] = run_case(case, args.model, str(WIKITEXT), args.type, args.tokens, args.threads)
    print(f"{'case':<18} {'peak RSS':>10} {'above imports':>14} {'wall':>8}  value")
    for case, row in rows.items():
        value = "" if row["value"] is None else f"{row['value']:.6f}"
        above = (row["peak_rss"] - row["base_rss"]) / 1e6
        print(f"{case:<18} {row['peak_rss'] / 1e6:>7.0f} MB {above:>11.0f} MB {row['wall_s']:>6.1f} s  {value}")
    print(f"GGUF {args.type} streamed == in memory: {identical}")
    result = {"model": args.model, "type": args.type, "threads": args.threads, "tokens": args.tokens,
              "gguf_identical": identical, "cases": rows,
              "note": "peak RSS = VmHWM of a fresh process, counter reset after imports (base_rss = RSS then)"}  # fmt: skip
    out = REPO / "bench" / "results" / f"streaming-{args.model}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
