"""ONNX int8 vs fp32 (issue 17): an encoder exported both ways, sentences/s in onnxruntime and
how close int8 stays (goal on all-MiniLM-L6-v2: >= 1.5x faster, mean cosine >= 0.99).

Sentences: the first 256 of WikiText-2 test (../shared, kompakt's splitting rule, headings left
out), never seen by any pass. Speed: kompakt.export.onnx_speed end to end (tokenizer + session,
longest sentences first, batches of 1 and 32), fp32 and int8 one after the other, best of
--repeats, --threads onnxruntime threads; beside them the same model in torch fp32
(kompakt.evaluate.sentence_speed: embed(), which batches the same way), same threads. The ratios
are the numbers to read: int8 / fp32 ONNX (the issue's goal) and each against torch. Cosine: int8
vs fp32 ONNX and int8 vs kompakt's embed() on all sentences.

    .venv/bin/python bench/onnx_int8.py [--model all-minilm-l6-v2] [--threads 1] [--repeats 2]

Prints a table and writes bench/results/onnx_int8-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from kompakt.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from kompakt.data.sentences import read_sentences
    from kompakt.evaluate.sentence_speed import measure_sentence_speed
    from kompakt.export import export
    from kompakt.export.onnx import onnx_bytes
    from kompakt.export.onnx_speed import onnx_embed, onnx_speed
    from kompakt.model.encode import embed
    from kompakt.model.load import load

    sentences = [s for s in read_sentences(WIKITEXT) if "=" not in s][: args.sentences]
    loaded = load(args.model, device="cpu", dtype="float32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        types = ("f32", "int8")
        paths = {t: export(loaded, format="onnx", type=t, out=Path(tmp) / t).path / "model.onnx" for t in types}
        sizes = {t: onnx_bytes(p.parent) for t, p in paths.items()}
        f32, int8 = (onnx_embed(paths[t], sentences, threads=args.threads) for t in types)
        reference = embed(loaded, sentences).numpy()
        in_torch = measure_sentence_speed(loaded, sentences, threads=args.threads, batch_size=32, repeats=args.repeats,
                                          batch1_sentences=len(sentences), batched_sentences=len(sentences))  # fmt: skip
        for batch, torch_rate in ((1, in_torch.batch1_per_s), (32, in_torch.batched_per_s)):
            speed = {t: onnx_speed(paths[t], sentences, batch, threads=args.threads, repeats=args.repeats)
                     for t in types}  # fmt: skip
            rows.append({"batch": batch, "torch_f32_per_s": round(torch_rate, 1), "f32_per_s": round(speed["f32"], 1),
                         "int8_per_s": round(speed["int8"], 1), "speedup": round(speed["int8"] / speed["f32"], 2),
                         "f32_vs_torch": round(speed["f32"] / torch_rate, 2),
                         "int8_vs_torch": round(speed["int8"] / torch_rate, 2)})  # fmt: skip
    cos_onnx, cos_ref = _cosine(int8, f32), _cosine(int8, reference)
    result = {"model": args.model, "sentences": len(sentences), "text": "WikiText-2 test, first sentences",
              "threads": args.threads, "repeats": args.repeats, "machine": platform.machine(),
              "load_average": round(os.getloadavg()[0], 1),
              "bytes": sizes, "f32_max_abs_vs_embed": float(np.abs(f32 - reference).max()),
              "int8_cosine_vs_f32": {"mean": float(cos_onnx.mean()), "min": float(cos_onnx.min())},
              "int8_cosine_vs_embed": {"mean": float(cos_ref.mean()), "min": float(cos_ref.min())},
              "rows": rows}  # fmt: skip
    print(f"{args.model}: {len(sentences)} sentences, {args.threads} thread(s); f32 {sizes['f32'] / 1e6:.1f} MB, "
          f"int8 {sizes['int8'] / 1e6:.1f} MB; f32 max |diff| to embed() {result['f32_max_abs_vs_embed']:.1e}; "
          f"int8 cosine to f32 mean {cos_onnx.mean():.4f} (lowest {cos_onnx.min():.4f})")  # fmt: skip
    print(f"{'batch':>5} {'torch f32':>10} {'ONNX f32':>9} {'ONNX int8':>10} {'int8/f32':>9} {'f32/torch':>10} {'int8/torch':>11}")
    for row in rows:
        print(f"{row['batch']:>5} {row['torch_f32_per_s']:>10} {row['f32_per_s']:>9} {row['int8_per_s']:>10} "
              f"{row['speedup']:>8}x {row['f32_vs_torch']:>9}x {row['int8_vs_torch']:>10}x")  # fmt: skip
    out = REPO / "bench" / "results" / f"onnx_int8-{args.model}.json"
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
