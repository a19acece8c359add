"""Sentence encoders in llama.cpp (issue 17): kompakt's GGUF export of all-MiniLM-L6-v2 at f16 / q8_0 / q4_0.

For each type the embedded all-MiniLM-L6-v2 is exported with kompakt's GGUF writer and run in
llama.cpp (llama-cpp-python, `Llama(path, embedding=True)`, the file's own mean pooling) on
held-out sentences: the first N sentences of WikiText-2 test (../shared/data, split by
kompakt.data.sentences.split_sentences, 3..128 tokens). Rows: file size, cosine of llama.cpp's
embedding to kompakt's `embed()` (equal to sentence-transformers'; both L2-normalised: mean,
5th percentile, min), and sentences/s at batch 1 in llama.cpp as a ratio to the original model
in torch (fp32, batch 1, same threads), measured in the same run.

    .venv/bin/python bench/encoder_gguf.py [--sentences 256] [--threads 2] [--types f16 q8_0 q4_0] [--note TEXT]

Prints a table and writes bench/results/encoder_gguf.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
TEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def held_out(loaded, n: int) -> list[str]:
    """The first `n` WikiText-2 test sentences of 3..128 tokens (special tokens included)."""
    from kompakt.data.sentences import split_sentences

    lines = [line.strip() for line in TEXT.read_text(encoding="utf-8").splitlines()]
    kept = []
    for sentence in split_sentences([line for line in lines if line and not line.startswith("=")]):
        if 3 <= len(loaded.tokenizer(sentence)["input_ids"]) <= 128:
            kept.append(sentence)
        if len(kept) == n:
            break
    return kept


def torch_speed(loaded, sentences: list[str]) -> float:
    """Sentences/s of kompakt's embed() at batch 1 (one warm-up sentence first)."""
    from kompakt.model.encode import embed

    embed(loaded, sentences[:1])
    start = time.perf_counter()
    for sentence in sentences:
        embed(loaded, [sentence])
    return len(sentences) / (time.perf_counter() - start)


def llamacpp_embed(path: Path, sentences: list[str], threads: int) -> tuple[torch.Tensor, float]:
    """(L2-normalised embeddings, sentences/s at batch 1) of the GGUF at `path` in llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
    try:
        llm.embed(sentences[0])  # warm-up
        start = time.perf_counter()
        vectors = [llm.embed(sentence, normalize=False) for sentence in sentences]
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    return torch.nn.functional.normalize(torch.tensor(vectors), dim=-1), len(sentences) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_gguf.json")
    parser.add_argument("--note", default="", help="conditions of the run (e.g. a shared, loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from results_file import ResultsFile

    from kompakt.export.gguf import write_gguf
    from kompakt.model.encode import embed
    from kompakt.model.load import load

    loaded = load("all-minilm-l6-v2", device="cpu", dtype="float32")
    sentences = held_out(loaded, args.sentences)
    reference = torch.nn.functional.normalize(embed(loaded, sentences), dim=-1)
    base = torch_speed(loaded, sentences)
    header = {"protocol": "encoder_gguf/1", "model": "all-minilm-l6-v2", "text": "WikiText-2 test, first sentences",
              "sentences": len(sentences), "threads": args.threads, "machine": platform.machine(),
              "torch_sentences_per_s_batch1": round(base, 1), "note": args.note}  # fmt: skip
    results = ResultsFile(args.out, header, merge=False)
    print(f"{len(sentences)} sentences; torch fp32 batch 1: {base:.1f} sentences/s ({args.threads} threads)")
    print(f"{'type':6} {'MB':>7} {'cos mean':>9} {'cos p5':>8} {'cos min':>8} {'sent/s':>8} {'x torch':>8}")
    with tempfile.TemporaryDirectory(prefix="kompakt-enc-gguf-") as tmp:
        for type in args.types:
            written = write_gguf(loaded, Path(tmp) / f"minilm-{type}.gguf", type=type)
            vectors, speed = llamacpp_embed(written.path, sentences, args.threads)
            cosines = (vectors * reference).sum(-1)
            row = {"name": type, "mb": round(written.size_bytes / 1e6, 2), "cos_mean": round(float(cosines.mean()), 5),
                   "cos_p5": round(float(cosines.quantile(0.05)), 5), "cos_min": round(float(cosines.min()), 5),
                   "sentences_per_s": round(speed, 1), "speed_vs_torch": round(speed / base, 2)}  # fmt: skip
            results.add(row)
            print(f"{type:6} {row['mb']:7.1f} {row['cos_mean']:9.5f} {row['cos_p5']:8.5f} {row['cos_min']:8.5f} "
                  f"{row['sentences_per_s']:8.1f} {row['speed_vs_torch']:8.2f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
