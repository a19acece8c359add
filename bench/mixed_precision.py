"""Mixed precision against llama.cpp at its best (issue 16): file size against KL on two texts.

llama.cpp's points: `llama-imatrix` on the BENCH.md calibration text (wiki.valid without
" <unk>", 128 chunks of 512) then `llama-quantize --imatrix` at Q4_0, IQ4_NL, Q4_K_M, Q3_K_M
(and Q4_0 without an imatrix), from kompakt's F16 GGUF of the original — made by
bench/peers/llamacpp_quantize.py into --peer (its llamacpp_quantize.json lists the files).

kompakt's points: the per-tensor allocation (kompakt.scoring.tensor_sensitivity + the knapsack
of kompakt.auto.allocate, as `compress --target bytes=` plans it) at each byte budget, then
AWQ + GPTQ on every tensor's own grid with calibration blocks from the same text, exported with
kompakt's GGUF writer (exactly the values GPTQ chose).

Every file is read back with `kompakt.load` (GGUF -> dequantized model) and scored by the same
evaluator against the original: KL, top-1, perplexity on (1) the first --tokens of WikiText-2
test and (2) text neither side calibrated on: 4096 tokens the original samples itself (seed 7;
its own distribution, not WikiText). Run alone on the machine:

    python bench/peers/llamacpp_quantize.py --gguf f16.gguf --text wiki.valid.tokens --out peer/
    python bench/mixed_precision.py --peer peer/ --out bench/results/mixed_precision.json

It also draws file size against KL on both texts (kompakt's curve, llama.cpp's points) into the
PNG beside the JSON; `--plot-only` redraws it from the JSON's rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quant import calibration_blocks, evaluation_ids, run_steps
from results_file import ResultsFile

MB = 1e6
SELF_TEXT_SEED = 7


def kompakt_types(original, calib, budgets: list[int], sensitivity_blocks: int) -> tuple[dict, list]:
    """Tensor costs measured once, then the allocation at every budget: (facts, [(budget, allocation, steps)])."""
    from kompakt.auto.allocate import within_bytes
    from kompakt.auto.facts import add_tensor_sensitivity, model_facts
    from kompakt.auto.mixed import decisions, mixed_steps
    from kompakt.recipe.schema import DataSpec
    from kompakt.scoring.tensor_sensitivity import tensor_sensitivity

    facts = model_facts(original, forward_tps=1.0)
    facts = add_tensor_sensitivity(facts, tensor_sensitivity(original.model, calib[:sensitivity_blocks]))
    data = DataSpec(calibration_blocks=calib.shape[0], block_len=calib.shape[1])
    from kompakt.auto.mixed import fixed_bytes

    fixed, method = fixed_bytes(facts, data), "quant.awq+quant.gptq"
    planned = []
    for budget in budgets:
        allocation = within_bytes(decisions(facts, method), budget, fixed)
        planned.append((budget, allocation, mixed_steps(allocation, facts, calib.shape[0], with_awq=True)))
    return facts, planned


def score(original, path: Path, texts: dict, tokens: int) -> dict:
    from kompakt.evaluate import fidelity
    from kompakt.model.load import load

    candidate = load(path)
    out = {"file_bytes": path.stat().st_size}
    for name, ids in texts.items():
        fid = fidelity(original, candidate, ids, window=512, stride=512, max_tokens=tokens)
        out[name] = {"kl": fid.kl_mean, "kl_p99": fid.kl_p99, "top1": fid.top1, "ppl": fid.ppl_candidate,
                     "ppl_original": fid.ppl_reference}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, help="bench/peers/llamacpp_quantize.py's --out (needed unless --plot-only)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mixed_precision.json")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kompakt" / "bench" / "mixed")
    parser.add_argument("--blocks", type=int, default=128, help="kompakt's calibration blocks of 512 (AWQ + GPTQ)")
    parser.add_argument("--sensitivity-blocks", type=int, default=8)
    parser.add_argument("--budgets-mb", default="75,80,86,91.7,93.5,105.5")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--merge", action="store_true", help="keep rows of an earlier run")
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's PNG from its rows, measure nothing")
    args = parser.parse_args()
    if args.plot_only:
        print(plot(args.out))
        return
    if args.peer is None:
        parser.error("--peer is needed to measure (bench/peers/llamacpp_quantize.py's --out)")

    import torch

    from kompakt.data import load_tokens
    from kompakt.export.gguf import write_gguf
    from kompakt.model.load import load

    torch.manual_seed(0)
    original = load(None)
    calib = calibration_blocks(original.tokenizer, args.blocks)
    texts = {"wikitext2_test": evaluation_ids(original.tokenizer),
             "self_generated": load_tokens(None, original, n_tokens=4096, seed=SELF_TEXT_SEED)}  # fmt: skip
    header = {"model": original.name, "tokens": args.tokens, "kompakt_blocks": args.blocks,
              "texts": {"wikitext2_test": "WikiText-2 test, first tokens", "self_generated":
                        f"4096 tokens the original samples itself (seed {SELF_TEXT_SEED})"}}  # fmt: skip
    results = ResultsFile(args.out, header, args.merge)
    args.work.mkdir(parents=True, exist_ok=True)

    peer = json.loads((args.peer / "llamacpp_quantize.json").read_text())
    for item in peer["files"] if isinstance(peer, dict) and "files" in peer else peer:
        label = f"llama.cpp {item['type']}" + (" + imatrix" if item.get("imatrix") else "")
        path = Path(item.get("path") or args.peer / item["file"])
        row = {"name": label, "side": "llama.cpp", **score(original, path, texts, args.tokens)}
        results.add(row)
        print_row(row)

    budgets = [int(float(b) * MB) for b in args.budgets_mb.split(",")]
    start = time.perf_counter()
    facts, planned = kompakt_types(original, calib, budgets, args.sensitivity_blocks)
    sensitivity_s = time.perf_counter() - start
    done: dict = {}
    for budget, allocation, steps in planned:
        model, _, seconds, _ = run_steps(original, [(s.name, s.config) for s in steps], calib, done)
        path = args.work / f"kompakt-{budget / MB:.1f}MB.gguf"
        written = write_gguf(model, path, type=steps[-1].config["format"], force=True)
        del model
        row = {"name": f"kompakt mixed <= {budget / MB:.1f} MB", "side": "kompakt", "budget": budget,
               "predicted_kl": allocation.kl, "types": dict(allocation.counts()), "pass_seconds": seconds,
               "sensitivity_seconds": sensitivity_s, "requantized_blocks": written.requantized_blocks,
               **score(original, path, texts, args.tokens)}  # fmt: skip
        results.add(row)
        print_row(row)
    print(plot(args.out))


def plot(results: Path) -> Path:
    """File size against KL, one panel per text: kompakt's curve and llama.cpp's points (the issue's
    picture), as PNG beside the JSON."""
    from matplotlib.figure import Figure

    from kompakt.analyze.plots import png_bytes

    rows = json.loads(results.read_text())["rows"]
    figure = Figure(figsize=(10, 4))
    for index, text in enumerate(("wikitext2_test", "self_generated")):
        axis = figure.add_subplot(1, 2, index + 1)
        ours = sorted((r["file_bytes"] / MB, r[text]["kl"]) for r in rows if r["side"] == "kompakt")
        axis.plot([x for x, _ in ours], [y for _, y in ours], marker="o", label="kompakt mixed (AWQ + GPTQ)")
        for r in (r for r in rows if r["side"] == "llama.cpp"):
            axis.scatter(r["file_bytes"] / MB, r[text]["kl"], marker="x", color="tab:red")
            axis.annotate(r["name"].removeprefix("llama.cpp "), (r["file_bytes"] / MB, r[text]["kl"]), fontsize=7)
        axis.set(title=text.replace("_", " "), xlabel="file size (MB)", ylabel="KL to the original", yscale="log")
        axis.legend(fontsize=7)
    path = results.with_suffix(".png")
    path.write_bytes(png_bytes(figure))
    return path


def print_row(row: dict) -> None:
    parts = [f"{row['name']:<34} {row['file_bytes'] / MB:7.1f} MB"]
    for text in ("wikitext2_test", "self_generated"):
        parts.append(f"{text}: KL {row[text]['kl']:.4f} top-1 {row[text]['top1']:.1%}")
    print("  ".join(parts), flush=True)


if __name__ == "__main__":
    main()
