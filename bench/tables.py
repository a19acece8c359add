"""Markdown tables (README / closing notes) from bench/results/pruning.json and quant.json.

    .venv/bin/python bench/tables.py            # both
    .venv/bin/python bench/tables.py quant      # one

Rows that a run has not reached yet are simply absent; a failed peer row shows its error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def pruning() -> None:
    data = _load("pruning")
    rows = {r["name"]: r for r in data["rows"]}
    if "dense" not in rows:
        return
    dense = rows["dense"]["ppl"]
    print(f"protocol: {data.get('protocol')}\n")
    print("| candidate | ppl | ratio | zeros | params | MB (fp32) | pass wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        if "ppl" not in r:
            print(f"| {r['name']} | failed: {r.get('error', '')[:100]} | | | | | |")
            continue
        print(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl'] / dense:.3f} | {r['zeros']:.1%} | {r['params'] / 1e6:.1f} M "
              f"| {r['bytes'] / 1e6:.0f} | {r['seconds']:.0f} |")  # fmt: skip
    width = rows.get("width ~50% params")
    if width and "prefill_speedup" in width:
        print(f"\nwidth: prefill {width['prefill_tps']:.0f} vs {width['dense_prefill_tps']:.0f} tokens/s "
              f"({width['prefill_speedup']:.2f}x), generation {width['generate_tps']:.1f} vs "
              f"{width['dense_generate_tps']:.1f} tokens/s ({width['generate_speedup']:.2f}x)")  # fmt: skip
    pairs = [(f"{k} {p}", f"llm-compressor {k} {p}") for p in ("50%", "2:4") for k in ("wanda", "sparsegpt")]
    lines = [(a, rows[a], rows[b]) for a, b in pairs if "ppl" in rows.get(a, {}) and "ppl" in rows.get(b, {})]
    if lines:
        print("\n| method | ours ppl | llm-compressor ppl | ours / theirs | ours s | theirs s | time ratio |")
        print("|---|---|---|---|---|---|---|")
        for name, a, b in lines:
            print(f"| {name} | {a['ppl']:.2f} | {b['ppl']:.2f} | {a['ppl'] / b['ppl']:.3f} | {a['seconds']:.0f} "
                  f"| {b['seconds']:.0f} | {a['seconds'] / b['seconds']:.2f} |")  # fmt: skip


def quant() -> None:
    data = _load("quant")
    rows = [r for r in data["rows"]]
    base = next((r for r in rows if r["name"] == "original fp32"), None)
    if base is None:
        return
    print(f"protocol: {data.get('protocol')}\n")
    print("| candidate | ppl | ratio | KL | top-1 | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["name"].startswith("GGUF"):
            continue
        if "ppl" not in r:
            print(f"| {r['name']} | failed: {r.get('error', '')[:100]} | | | | | |")
            continue
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        top1 = f"{r['top1']:.1%}" if r.get("top1") is not None else "-"
        print(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl'] / base['ppl']:.3f} | {kl} | {top1} "
              f"| {r.get('seconds', 0):.0f} | {r.get('cpu_seconds', 0):.0f} |")  # fmt: skip
    gguf = [r for r in rows if r["name"].startswith("GGUF") and "ppl" in r]
    if gguf:
        print("\n| GGUF, first 16k tokens | ppl | ratio | KL | top-1 | file MB | llama.cpp generation tokens/s |")
        print("|---|---|---|---|---|---|---|")
        for r in gguf:
            ref = r.get("ppl_original") or r["ppl"]
            print(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl'] / ref:.3f} | {r['kl']:.4f} | {r['top1']:.1%} "
                  f"| {r['file_bytes'] / 1e6:.1f} | {r['gen_tps']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    which = sys.argv[1:] or ["pruning", "quant"]
    for name in which:
        {"pruning": pruning, "quant": quant}[name]()
        print()
