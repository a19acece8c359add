"""Mixture-of-Experts benchmark (issue 18): an upcycled SmolLM2 MoE, expert pruning vs merging,
fewer experts per token, 4-bit GPTQ vs RTN.

No MoE weights install offline, so the MoE is built (kompakt.model.upcycle): SmolLM2-135M's MLPs
split into `--experts` experts (co-activation-clustered neurons, least-squares router, fitted
scale; `--mode copy`: every expert a noisy copy of the MLP), top-`--top-k`; with `--shared F`
(default 0.5) the fraction F of each MLP's strongest neurons stays an always-on shared expert and
the model is a Qwen2-MoE (`--shared 0`: a Mixtral), then healed with distill.kd from the dense model
(`--kd-tokens` of WikiText-2 validation, " <unk>" removed). Routing entropy (mean nats per token,
and the load balance normalised by log E) and pairwise expert similarity (cosine of the experts'
outputs on the same tokens) are reported before and after the distillation. The MoE is saved
(`--moe-dir`) and reused by later runs.

Then, against the MoE as the reference (KL(MoE || candidate), top-1 agreement, perplexity ratio on
the first `--eval-tokens` tokens of WikiText-2 test, windows of 512, BENCH.md):
  prune   50 % of the experts removed per layer: moe.prune REAP, moe.prune frequency, moe.merge
          (frequency-weighted, neuron-aligned); moe.topk top-1 (no expert removed)
  quant   quant.rtn vs quant.gptq, 4-bit, group 64, symmetric, every expert with its routed
          calibration (the MoE's router, embeddings and head stay fp32)
  heal    the 50 % cuts of the prune part (merge, REAP, frequency), each then healed by distill.kd
          from the MoE for `--heal-tokens` (default 153600: the dense healing bench's budget,
          bench/heal.py; T 2, 4 x 256, `--lr`; alpha `--heal-alpha`, default 1: with 0.5 the
          cross-entropy half learns WikiText past the MoE itself, ppl below the MoE's and KL to it
          up, so only pure distillation measures the gap to the MoE); KL before and after, and the share of
          the gap recovered (1 - KL after / KL before). `--only NAME` runs the candidates whose
          name contains NAME.
  scores  50 % of the experts removed by each of five scores (REAP, frequency, REAP x frequency,
          mean output norm, output norm x frequency) from one set of routing statistics, with the
          spread (coefficient of variation) of the routing share and of the mean gate across each
          layer's experts. `--router-spread S` upcycles with a sharper router, `--balance` with
          one refitted to equal routing shares on the calibration tokens, `--kd-tokens 0`
          skips the distillation (use one `--moe-dir` per spread: the upcycled model is cached there).
Calibration: `--calib-blocks` blocks of 512 from wiki.valid (BENCH.md sampling).
`--speed` adds llama.cpp generation tokens/s of each candidate's F16 GGUF, as a ratio to the MoE's.

    nice -n 10 .venv/bin/python bench/moe.py --kd-tokens 150000             # full (hours on 2 cores)

Measured (under load, 2 shared cores; bench/results/moe-s50.json):
    nice -n 5 .venv/bin/python bench/moe.py --shared 0.5 --kd-tokens 20480 --lr 3e-4 --calib-blocks 16 \
        --eval-tokens 4096 --parts prune --moe-dir /tmp/moe/moe8x2-s50 --suffix=-s50   # then --parts quant --merge
the upcycled MoE is KL 0.83 / ppl x2.11 from SmolLM2 before KD, KL 0.76 / ppl x1.40 after 20k tokens
(14.6 min); at 50 % of the routed experts removed, merging (KL 0.32 to the MoE) beats frequency
pruning (0.50) and REAP (0.58). REAP's mean over routed tokens ignores how often an expert is
chosen, and this MoE's routing shares differ (CV 0.27): --parts scores at --router-spread 0.1 / 1 / 2
(bench/results/moe-scores-spread*.json) has every frequency-weighted score ahead of REAP at every
router sharpness; with --balance at spread 1 / 2 REAP ties frequency (moe-scores-balanced-spread*.json;
see moe.prune). The balanced spread-1 MoE after the same 20k KD tokens (--router-spread 1 --balance,
moe-s50-balanced-spread1.json): REAP KL 0.177, frequency 0.198, merge 0.208; GPTQ 0.133 vs RTN 0.310;
healed (--parts heal): REAP 0.123, frequency 0.130, merge 0.141. 4-bit g64: GPTQ KL 0.169 / ppl x1.13 vs RTN 0.341 / x1.29 (to the MoE).
20k more KD tokens (bench/results/moe-s50-kd40k.json) changed none of this.
Healing the 50 % cuts (--parts heal --heal-tokens 153600 --suffix=-s50-heal, alone; moe-s50-heal.json):
KL to the MoE merge 0.313 -> 0.201, REAP 0.589 -> 0.238, frequency 0.508 -> 0.234 (alpha 1). Without the shared expert (--shared 0) split 8 x top-2 is KL 9.2 from
SmolLM2 before KD; split 8 x top-8 KL 0.52, so the partition itself is sound.
    .venv/bin/python bench/moe.py --layers 4 --eval-tokens 1024 --kd-tokens 1024 --calib-blocks 2 \
        --moe-dir /tmp/moe-smoke --suffix=-smoke                              # smoke run (minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal import calibration, kd_settings  # noqa: E402
from results_file import ResultsFile  # noqa: E402

from kompakt.model.upcycle import ROUTER_SPREAD  # noqa: E402


def eval_ids(tokenizer) -> torch.Tensor:
    from kompakt.data import read_texts, tokenize_texts

    return tokenize_texts(read_texts(DATA / "wiki.test.raw"), tokenizer)


def quality(reference, candidate, ids: torch.Tensor, tokens: int) -> dict:
    from kompakt.evaluate import fidelity

    r = fidelity(reference, candidate, ids, window=512, stride=512, max_tokens=tokens)
    return {"ppl": round(r.ppl_candidate, 3), "ppl_reference": round(r.ppl_reference, 3),
            "ppl_ratio": round(r.ppl_candidate / r.ppl_reference, 4), "kl": round(r.kl_mean, 4),
            "top1": round(r.top1, 4)}  # fmt: skip


def apply(name: str, loaded, values: dict, calib=None, teacher=None):
    from kompakt.passes.base import PassContext, build_config, get_pass

    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: teacher or loaded, calibration=lambda: calib, seed=0)
    start = time.perf_counter()
    report = spec.apply(ctx, build_config(spec, values))
    return report, round(time.perf_counter() - start, 1)


def clone(loaded):
    from kompakt.model.loaded import LoadedModel

    return LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name=loaded.name)


def routing(moe, calib: torch.Tensor) -> dict:
    """Routing entropy, load balance and expert similarity of an MoE over (up to 8) calibration blocks."""
    from kompakt.model.upcycle import block_inputs, expert_similarity
    from kompakt.scoring.experts import expert_stats

    stats = expert_stats(moe.model, [b.to(moe.device) for b in calib[:8].split(2)])
    similarity = expert_similarity(moe, block_inputs(moe, calib, 1024))
    mean = lambda values: round(float(sum(values) / len(values)), 4)  # noqa: E731
    return {"routing_entropy": mean(stats.token_entropy), "load_balance": mean(stats.load_entropy),
            "expert_similarity": mean(similarity), "expert_similarity_max": round(max(similarity), 4)}  # fmt: skip


def build_moe(args, dense, calib, ids, results: ResultsFile):
    """The upcycled MoE (loaded from --moe-dir when it is there), its rows against the dense model."""
    from kompakt.model.load import load
    from kompakt.model.upcycle import upcycle

    target = Path(args.moe_dir)
    if (target / "config.json").exists():
        return load(target, device="cpu", dtype="float32")
    start = time.perf_counter()
    unhealed = target.with_name(target.name + "-upcycled")  # kept so a longer KD need not upcycle again
    if (unhealed / "config.json").exists():
        moe = load(unhealed, device="cpu", dtype="float32")
    else:
        moe = upcycle(dense, experts=args.experts, top_k=args.top_k, mode=args.mode, calibration=calib,
                      shared=args.shared, router_spread=args.router_spread, balance=args.balance)
        moe.model.save_pretrained(unhealed)
        moe.tokenizer.save_pretrained(unhealed)
    built = round(time.perf_counter() - start, 1)
    results.add({"name": "upcycled (before KD)", "order": 1, "parameters": moe.num_parameters(), "wall_s": built,
                 "reference": "dense", **routing(moe, calib), **quality(dense, moe, ids, args.eval_tokens)})  # fmt: skip
    if not args.kd_tokens:  # the upcycled MoE itself (e.g. the scores part at several router spreads)
        return moe
    report, wall = apply("distill.kd", moe, kd_settings(args.kd_tokens, 0.5, args.lr, 4, args.threads), teacher=dense)
    results.add({"name": "upcycled + distill.kd", "order": 2, "parameters": moe.num_parameters(), "wall_s": wall,
                 "tokens_seen": report.details.get("tokens"), "reference": "dense", **routing(moe, calib),
                 **quality(dense, moe, ids, args.eval_tokens)})  # fmt: skip
    moe.model.save_pretrained(target)
    moe.tokenizer.save_pretrained(target)
    return moe


def gguf_speed(loaded, prompt_ids: list[int], n: int = 32) -> float:
    """llama.cpp greedy generation tokens/s of `loaded` as an F16 GGUF (best of two)."""
    from llama_cpp import Llama

    from kompakt.export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(loaded, Path(tmp) / "m.gguf", type="f16")
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)
        best = 0.0
        for _ in range(2):
            llm.reset()
            start = time.perf_counter()
            done = 0
            for token in llm.generate(prompt_ids, top_k=1):
                done += 1
                if done >= n:
                    break
            best = max(best, done / (time.perf_counter() - start))
        llm.close()
    return best


CANDIDATES = {
    "prune": [
        ("REAP 50 %", "moe.prune", {"fraction": 0.5, "method": "reap"}),
        ("frequency 50 %", "moe.prune", {"fraction": 0.5, "method": "frequency"}),
        ("merge 50 % (MC-SMoE)", "moe.merge", {"fraction": 0.5}),
        ("top-1 (no expert removed)", "moe.topk", {"top_k": 1}),
    ],
    "heal": [
        ("merge 50 % (MC-SMoE) + distill.kd", "moe.merge", {"fraction": 0.5}),
        ("REAP 50 % + distill.kd", "moe.prune", {"fraction": 0.5, "method": "reap"}),
        ("frequency 50 % + distill.kd", "moe.prune", {"fraction": 0.5, "method": "frequency"}),
    ],
    "quant": [
        ("RTN 4-bit g64 sym", "quant.rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
        ("GPTQ 4-bit g64 sym", "quant.gptq", {"bits": 4, "group_size": 64, "symmetric": True}),
    ],
}


def heal_row(args, moe, candidate, ids, row: dict) -> dict:
    """`row` (the pruned candidate against the MoE) with distill.kd from the MoE added."""
    values = kd_settings(args.heal_tokens, args.heal_alpha, args.lr, 4, args.threads)
    report, wall = apply("distill.kd", candidate, values, teacher=moe)
    after = quality(moe, candidate, ids, args.eval_tokens)
    recovered = 1 - after["kl"] / row["kl"] if row["kl"] > 0 else None
    before = {key: row[key] for key in ("ppl", "ppl_ratio", "kl", "top1")}
    return {**row, **after, "before_kd": before, "kd_alpha": args.heal_alpha, "kd_tokens": report.details.get("tokens"),
            "kd_wall_s": wall,
            "kd_tokens_per_s": round(report.details.get("tokens", 0) / wall, 1) if wall else None,
            "kl_gap_recovered": round(recovered, 3) if recovered is not None else None}  # fmt: skip


SCORES = {  # expert scores compared by the scores part (the first two are moe.prune's methods)
    "REAP (mean over routed tokens of gate x output norm)": lambda s, i: s.reap[i],
    "frequency (tokens routed)": lambda s, i: s.frequency[i],
    "REAP x frequency (sum over routed tokens)": lambda s, i: s.reap[i] * s.frequency[i],
    "output norm, mean over routed tokens (EAN mean)": lambda s, i: s.output_norm[i],
    "output norm x frequency (EAN sum)": lambda s, i: s.output_norm[i] * s.frequency[i],
}


def run_scores(args, moe, calib, ids, results: ResultsFile) -> None:
    """Half of each layer's routed experts removed by each score of SCORES, from one set of routing
    statistics: which score predicts what an expert is worth on this MoE. The spread of the routing
    share and of the mean gate across experts (coefficient of variation, mean over layers) says how
    much information frequency and REAP's gate term have to work with."""
    import numpy as np

    from kompakt.model.moe import keep_experts, num_experts
    from kompakt.passes.moe_prune import calibration_batches, lowest
    from kompakt.scoring.experts import expert_stats

    stats = expert_stats(moe.model, calibration_batches(moe, calib, args.calib_blocks, 4))
    total = num_experts(moe)
    cv = lambda rows: round(float(np.mean([np.std(r) / np.mean(r) for r in rows])), 3)  # noqa: E731
    spread = {"router_spread": args.router_spread, "frequency_cv": cv(stats.frequency), "gate_mean_cv": cv(stats.gate_mean),
              "output_norm_cv": cv(stats.output_norm)}  # fmt: skip
    for order, (label, score) in enumerate(SCORES.items(), start=30):
        layers = [np.asarray(score(stats, i), dtype=float) for i in range(len(stats.reap))]
        candidate = clone(moe)
        keep_experts(candidate, [[e for e in range(total) if e not in lowest(s, total // 2)] for s in layers])
        row = {"name": f"score: {label}", "order": order, "parameters": candidate.num_parameters(), "reference": "MoE",
               **spread, **quality(moe, candidate, ids, args.eval_tokens)}  # fmt: skip
        results.add(row)
        print(json.dumps(row))


def run_candidates(args, moe, calib, ids, results: ResultsFile) -> None:
    base_speed = gguf_speed(moe, ids[:16].tolist()) if args.speed else None
    for part in args.parts:
        if part == "scores":
            run_scores(args, moe, calib, ids, results)
            continue
        for order, (label, name, values) in enumerate(CANDIDATES[part], start={"prune": 10, "heal": 15}.get(part, 20)):
            if args.only and not any(wanted in label for wanted in args.only):
                continue
            candidate = clone(moe)
            values = {**values, "max_blocks": args.calib_blocks} if name in ("moe.prune", "moe.merge") else values
            report, wall = apply(name, candidate, values, calib=calib)
            row = {"name": label, "order": order, "pass": name, "parameters": candidate.num_parameters(),
                   "wall_s": wall, "summary": report.summary, "reference": "MoE",
                   **quality(moe, candidate, ids, args.eval_tokens)}  # fmt: skip
            if args.speed and part == "prune":
                row["llamacpp_gen_speed_ratio"] = round(gguf_speed(candidate, ids[:16].tolist()) / base_speed, 3)
            if part == "heal":
                row = heal_row(args, moe, candidate, ids, row)
            results.add(row)
            print(json.dumps(row))
            del candidate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--mode", choices=("split", "copy"), default="split", help="kompakt.model.upcycle mode")
    parser.add_argument("--shared", type=float, default=0.5,
                        help="fraction of each MLP kept as an always-on shared expert (Qwen2-MoE); 0: Mixtral")
    parser.add_argument("--kd-tokens", type=int, default=150000, help="distill.kd of the upcycled MoE (0: none)")
    parser.add_argument("--heal-tokens", type=int, default=153600, help="heal part: distill.kd tokens after merging")
    parser.add_argument("--heal-alpha", type=float, default=1.0,
                        help="heal part: distill.kd alpha (1: the MoE's distributions only; 0.5 also learns the text)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--router-spread", type=float, default=ROUTER_SPREAD,
                        help="std of the upcycled router's logits (kompakt.model.upcycle; larger: sharper routing)")
    parser.add_argument("--balance", action="store_true",
                        help="upcycle with a router refitted to equal routing shares (as a load-balancing loss trains)")
    parser.add_argument("--parts", nargs="+", choices=sorted([*CANDIDATES, "scores"]), default=sorted(CANDIDATES))
    parser.add_argument("--only", action="append", help="run only the candidates whose name contains this (repeatable)")
    parser.add_argument("--speed", action="store_true", help="llama.cpp generation speed ratios (prune part)")
    parser.add_argument("--moe-dir", default=str(Path.home() / ".cache" / "kompakt" / "bench" / "smollm2-moe"))
    parser.add_argument("--layers", type=int, default=0, help="smoke runs: keep SmolLM2's first N layers only")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an existing results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from kompakt.model.load import load

    dense = load("smollm2-135m", device="cpu", dtype="float32")
    if args.layers:  # smoke runs only: the first N layers (numbers then do not compare with full runs)
        from kompakt.model.surgery import drop_layers

        total = dense.model.config.num_hidden_layers
        dense, _ = drop_layers(dense, list(range(args.layers, total)))
    kept = f", first {args.layers} layers only" if args.layers else ""
    router = f", router spread {args.router_spread:g}" if args.router_spread != ROUTER_SPREAD else ""
    router += ", balanced router" if args.balance else ""
    header = {"bench": "moe", "protocol": "moe-1", "model": f"smollm2-135m{kept} upcycled: {args.experts} experts, top-{args.top_k}, {args.mode}, shared {args.shared:g}{router}",
              "kd_tokens": args.kd_tokens, "calib_blocks": args.calib_blocks, "eval_tokens": args.eval_tokens,
              "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)",
              "torch": torch.__version__}  # fmt: skip
    results = ResultsFile(RESULTS / f"moe{args.suffix}.json", header, args.merge)
    calib = calibration(dense.tokenizer, args.calib_blocks)
    ids = eval_ids(dense.tokenizer)
    moe = build_moe(args, dense, calib, ids, results)
    run_candidates(args, moe, calib, ids, results)
    for row in results.read()["rows"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
