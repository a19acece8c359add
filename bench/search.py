"""Architecture search benchmark (issue 16, part 2): does the proxy rank shapes as healing does,
and does the searched winner beat the fixed width-only and depth-only cuts at the same size?

Protocol (../shared/BENCH.md): SmolLM2-135M (embedded, fp32) is the original and the teacher.
Training and calibration text: WikiText-2 validation (" <unk>" removed). KL, top-1 and the
perplexity ratio: the first `--eval-tokens` tokens of WikiText-2 test, windows of `--window`
(512 = the protocol; smaller only for reduced runs, said in the JSON).

`kompakt.auto.search.run.search` plans `--candidates` shapes at `--target`, gives each a proxy
(cut with the passes' importance scores, `--proxy-tokens` of distill.kd, KL), heals the best
`--finalists` with `--heal-tokens` more. The goal run heals every candidate (finalists =
candidates) with the 150k tokens of the width-only anchor so the two rankings compare:

    nice -n 10 .venv/bin/python bench/search.py --candidates 8 --finalists 8 \
        --proxy-tokens 4096 --heal-tokens 153600 --eval-tokens 16384 --window 512 --name goal

Reported: Spearman's rho between the proxy KL and the healed KL over the healed candidates
(goal >= 0.7), the winner's healed KL against the width-only anchor (BENCH.md: KL 1.415 after
153.6k tokens) and against the depth-only candidate healed in the same run, each candidate's
measured llama.cpp speed. Writes bench/results/search-<name>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
RESULTS = REPO / "bench" / "results"
WIDTH_ONLY_ANCHOR = {"kl_mean": 1.415, "ppl_ratio": 2.488, "tokens": 153600, "source": "BENCH.md, bench/heal.py --part width"}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho (Pearson correlation of the ranks); None under 3 pairs."""
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def clean_valid_text(work: Path) -> Path:
    path = work / "wiki.valid.clean.txt"
    if not path.is_file():
        path.write_text((DATA / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", ""))
    return path


def summarize(rows: list[dict], winner: int | None) -> dict:
    healed = [r for r in rows if (r.get("final") or {}).get("kl_mean") is not None]
    rho = spearman([r["proxy"]["kl_mean"] for r in healed], [r["final"]["kl_mean"] for r in healed])
    depth = next((r for r in healed if r["kind"] == "depth"), None)
    best = next((r for r in rows if r["index"] == winner), None)
    best_kl = (best or {}).get("final", {}) or {}
    return {
        "healed": len(healed), "spearman_proxy_vs_healed": rho,
        "winner": winner, "winner_kl": best_kl.get("kl_mean"),
        "depth_only_kl": (depth or {}).get("final", {}).get("kl_mean") if depth else None,
        "width_only_anchor": WIDTH_ONLY_ANCHOR,
        "beats_width_only": None if best_kl.get("kl_mean") is None else best_kl["kl_mean"] < WIDTH_ONLY_ANCHOR["kl_mean"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="params=0.5")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--finalists", type=int, default=8)
    parser.add_argument("--proxy-tokens", type=int, default=4096)
    parser.add_argument("--heal-tokens", type=int, default=153600)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4, help="distill.kd's peak learning rate: the width-only anchor's (bench/heal.py)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-search")
    parser.add_argument("--name", default="goal")
    parser.add_argument("--note", default="", help="said next to the numbers (e.g. reduced run, machine under load)")
    args = parser.parse_args()
    from kompakt.auto.search.run import search

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = search(None, target=args.target, data=str(clean_valid_text(args.work)),
                    evaluation=str(DATA / "wiki.test.raw"), out=args.work / args.name, count=args.candidates,
                    finalists=args.finalists, proxy_tokens=args.proxy_tokens, heal_tokens=args.heal_tokens,
                    eval_tokens=args.eval_tokens, window=args.window, blocks=args.blocks, lr=args.lr,
                    latency=not args.no_latency)  # fmt: skip
    summary = summarize(result.rows, result.winner)
    print(f"{'#':>2} {'kind':<22} {'params':>7} {'proxy KL':>9} {'healed KL':>9} {'gen tok/s':>9}")
    for row in result.rows:
        proxy, final, speed = row.get("proxy") or {}, row.get("final") or {}, row.get("latency") or {}
        print(f"{row['index']:>2} {row['kind']:<22} {row['params_fraction']:>7.1%} {proxy.get('kl_mean') or float('nan'):>9.4f} "
              f"{final.get('kl_mean') or float('nan'):>9.4f} {speed.get('generate_tps') or float('nan'):>9.0f}")  # fmt: skip
    print(json.dumps(summary, indent=1))
    print(f"winner: {result.why}")
    document = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary, "why": result.why, "pareto": result.pareto, "candidates": result.rows,
                "wall_s": round(time.perf_counter() - started, 1), "machine": platform.processor() or platform.machine(),
                "note": " ".join(filter(None, [args.note, "eval windows of --window tokens (512 = BENCH.md); "
                                                "times measured on a shared machine"]))}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    from kompakt.atomic import write_text

    write_text(RESULTS / f"search-{args.name}.json", json.dumps(document, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
