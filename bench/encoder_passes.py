"""Compression passes on a sentence encoder (issue 17): all-MiniLM-L6-v2, before any healing.

Rows: int8 (per output channel) and int4 (groups of 128) weight quantization of every encoder
Linear by RTN and by GPTQ; prune.depth 6 -> 3 layers by DistilBERT's every-other-layer
initialisation and by measured scores (cosine skip score, block influence). Each row: mean,
5th-percentile and minimum cosine between the compressed model's and the original's sentence
embeddings (kompakt.model.encode.embed: the model's own mean pooling + normalisation) on
held-out sentences, parameters, and the pass's wall time.

Text (benchmark only; the product never reads ../shared): held-out = the first `--heldout`
sentences of WikiText-2 *test* (kompakt.data.sentences' splitting rule, headings dropped);
calibration = `--calib` sentences sampled (seed 0) from WikiText-2 *validation* (" <unk>"
removed), padded per batch with an attention mask, at most 128 tokens. The two never overlap.

    OMP_NUM_THREADS=2 .venv/bin/python bench/encoder_passes.py
    .venv/bin/python bench/encoder_passes.py --rows int8-rtn,int8-gptq --heldout 100   # quick

Prints a table and writes bench/results/encoder_passes.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from results_file import ResultsFile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
ROWS = {
    "int8-rtn": ("quant.rtn", {"bits": 8, "group_size": None}),
    "int8-gptq": ("quant.gptq", {"bits": 8, "group_size": None}),
    "int4-rtn": ("quant.rtn", {"bits": 4, "group_size": 128}),
    "int4-gptq": ("quant.gptq", {"bits": 4, "group_size": 128}),
    "depth3-every_other": ("prune.depth", {"select": "every_other"}),
    "depth3-cosine": ("prune.depth", {"count": 3, "method": "cosine", "max_blocks": 128}),
    "depth3-block_influence": ("prune.depth", {"count": 3, "method": "block_influence", "max_blocks": 128}),
}


def sentences(path: Path, drop_unk: bool) -> list[str]:
    from kompakt.data.sentences import split_sentences

    text = path.read_text(encoding="utf-8")
    if drop_unk:
        text = text.replace(" <unk>", "")
    lines = [line for line in text.splitlines() if not line.strip().startswith("=")]  # headings
    return split_sentences(lines)


def run_row(name: str, original, calibration, heldout: list[str], reference: torch.Tensor) -> dict:
    from kompakt.model.encode import embed
    from kompakt.model.loaded import LoadedModel
    from kompakt.passes.base import PassContext, build_config, get_pass

    pass_name, values = ROWS[name]
    spec = get_pass(pass_name)
    student = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name=original.name,
                          pooling=original.pooling)  # fmt: skip
    ctx = PassContext(loaded=student, original=lambda: original, calibration=lambda: calibration, seed=0)
    start = time.perf_counter()
    report = spec.apply(ctx, build_config(spec, values))
    seconds = time.perf_counter() - start
    cos = torch.nn.functional.cosine_similarity(embed(report.loaded, heldout), reference, dim=-1)
    return {
        "name": name, "pass": pass_name, "config": values, "summary": report.summary,
        "cosine_mean": float(cos.mean()), "cosine_p5": float(cos.quantile(0.05)), "cosine_min": float(cos.min()),
        "parameters": report.loaded.num_parameters(), "seconds": round(seconds, 2),
        "removed_layers": report.details.get("removed_layers"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_passes.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import kompakt
    from kompakt.data.sentence_batches import sentence_batch
    from kompakt.model.encode import embed

    original = kompakt.load(args.model, device="cpu")
    heldout = sentences(DATA / "wiki.test.raw", drop_unk=False)[: args.heldout]
    calibration = sentence_batch(original, sentences(DATA / "wiki.valid.tokens", drop_unk=True), args.calib, 128)
    reference = embed(original, heldout)
    header = {
        "model": args.model, "parameters": original.num_parameters(), "threads": torch.get_num_threads(),
        "heldout": f"first {len(heldout)} sentences of WikiText-2 test",
        "calibration": f"{len(calibration)} sentences of WikiText-2 validation, seed 0, <= 128 tokens "
                       f"({calibration.tokens} tokens)",
        "note": "cosine to the original's embeddings before any healing; timings on a shared machine",
    }  # fmt: skip
    results = ResultsFile(args.out, header, merge=True)
    print(f"{'row':<24} {'cos mean':>9} {'cos p5':>8} {'cos min':>8} {'params':>11} {'s':>7}")
    for name in args.rows.split(","):
        row = run_row(name, original, calibration, heldout, reference)
        results.add(row)
        print(f"{name:<24} {row['cosine_mean']:>9.5f} {row['cosine_p5']:>8.5f} {row['cosine_min']:>8.5f} "
              f"{row['parameters']:>11,} {row['seconds']:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
