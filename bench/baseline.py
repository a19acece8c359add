"""Baseline of the embedded model (issue 2): quality, speed, memory and load time.

Protocol (../shared/BENCH.md): WikiText-2 test, first 32768 tokens, windows of 512, stride 512.
Load time is measured twice in fresh subprocesses: cold (empty KOMPAKT_CACHE, so the GGUF is
converted) and cached (the converted directory is reused).

    .venv/bin/python bench/baseline.py [--model smollm2-135m] [--tokens 32768]

Prints a table and writes bench/results/baseline-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kompakt.atomic import atomic_file

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
_LOAD_SNIPPET = "import time,sys; t=time.perf_counter(); import kompakt; kompakt.load(sys.argv[1]); print(time.perf_counter()-t)"


def timed_load(model: str, cache: str) -> float:
    """Seconds to load `model` in a fresh interpreter with KOMPAKT_CACHE=cache (imports included)."""
    env = {**os.environ, "KOMPAKT_CACHE": cache}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_SNIPPET, model], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()

    from kompakt.data import read_texts, tokenize_texts
    from kompakt.evaluate import evaluate
    from kompakt.model.load import load

    with tempfile.TemporaryDirectory() as cache:
        cold = timed_load(args.model, cache)
        cached = timed_load(args.model, cache)

    loaded = load(args.model)
    ids = tokenize_texts(read_texts(WIKITEXT), loaded.tokenizer)
    started = time.perf_counter()
    result = evaluate(loaded, ids=ids, window=args.window, stride=args.window, max_tokens=args.tokens)
    eval_seconds = time.perf_counter() - started
    row = result.to_dict()
    row.update(
        model=args.model,
        load_cold_s=round(cold, 2),
        load_cached_s=round(cached, 2),
        eval_wall_s=round(eval_seconds, 1),
        machine=f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    )
    print_table(row)
    out = REPO / "bench" / "results" / f"baseline-{args.model}.json"
    with atomic_file(out) as tmp:  # never a half-written result
        tmp.write_text(json.dumps(row, indent=2, default=str) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


def print_table(row: dict) -> None:
    width = max(len(key) for key in row)
    for key, value in row.items():
        if isinstance(value, dict):
            value = json.dumps(value, default=str)
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
