"""Measure one model as a user would run it, in a fresh process: load time, prompt and
generation tokens/s (a sentence encoder: sentences/s at batch 1 and 32), and the process's peak
memory while running.

A fresh process is the point: the peak resident memory of a process that holds only this
model is what a laptop needs, which a measurement inside kompakt (with the original, the
candidate and the evaluator loaded) cannot tell.

    python -m kompakt.report.probe MODEL --backend llamacpp|transformers|onnxruntime [--threads N]
                                   [--sentences FILE]

(onnxruntime: MODEL is an ONNX export directory of a sentence encoder, kompakt.export.onnx.
A sentence encoder is timed on FILE's sentences, e.g. a run's held-out ones, else on kompakt's
shipped held-out set: its speed-up from int8 or fewer layers depends on sentence length.)

prints one JSON object (speeds: the best of 3 runs, since a shared machine only ever slows a
run down). `probe(...)` runs it and returns that object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 128
GEN_TOKENS = 64
REPEATS = 3


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec;
    ru_maxrss would carry over the parent's peak through fork + exec. (kompakt.process_memory
    imports no torch, which would add ≈ 380 MB to what is measured.)"""
    from kompakt.process_memory import high_water_mark, max_rss_lifetime

    return high_water_mark() or max_rss_lifetime()


def _llamacpp(path: str, threads: int, sentences: str | None = None) -> dict:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=PROMPT_TOKENS + GEN_TOKENS + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0)  # fmt: skip
    load_s = time.perf_counter() - started
    vocab = llm.n_vocab()
    prompt = [(i * 7919) % (vocab - 200) + 100 for i in range(PROMPT_TOKENS)]
    prefill = generate = 0.0
    for _ in range(REPEATS):  # best of REPEATS: a shared machine only ever slows a run down
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill = max(prefill, PROMPT_TOKENS / (time.perf_counter() - started))
        llm.reset()
        tokens = llm.generate(prompt[:16], temp=0.0)
        next(tokens)  # the 16-token prompt and the first token: not part of the generation rate
        made, started = 0, time.perf_counter()
        for _ in tokens:
            made += 1
            if made >= GEN_TOKENS:
                break
        generate = max(generate, made / (time.perf_counter() - started))
    return {"backend": "llama.cpp (llama-cpp-python)", "load_s": load_s, "prefill_tps": prefill, "generate_tps": generate}


def _transformers(path: str, threads: int, sentences: str | None = None) -> dict:
    import torch

    from kompakt.evaluate import measure_speed
    from kompakt.model.load import load

    torch.set_num_threads(threads)
    started = time.perf_counter()
    loaded = load(path)
    load_s = time.perf_counter() - started
    if loaded.is_encoder:
        return _encoder(loaded, load_s, sentences)
    speed = max(
        (measure_speed(loaded, prompt_batch=1, prompt_len=PROMPT_TOKENS, gen_tokens=GEN_TOKENS, repeats=1)
         for _ in range(REPEATS)),
        key=lambda s: s.generate_tokens_per_s,
    )  # fmt: skip
    return {"backend": speed.backend + f" {speed.dtype}", "load_s": load_s,
            "prefill_tps": speed.prefill_tokens_per_s, "generate_tps": speed.generate_tokens_per_s}  # fmt: skip


def _encoder(loaded, load_s: float, sentences: str | None) -> dict:
    """A sentence encoder: sentences/s at batch 1 and 32 on `sentences`' (a file) or kompakt's
    held-out sentences (best of REPEATS), through the same embed() a user calls."""
    from kompakt.evaluate import load_sentences, measure_sentence_speed

    chosen = load_sentences(sentences).sentences
    speed = measure_sentence_speed(loaded, chosen, repeats=REPEATS)
    return {"backend": speed.backend + f" {speed.dtype}", "load_s": load_s, "distinct_sentences": len(chosen),
            "batch1_sentences": speed.batch1_sentences,
            "batched_sentences": speed.batched_sentences, "sentences_b1_per_s": speed.batch1_per_s,
            "sentences_b32_per_s": speed.batched_per_s}  # fmt: skip


def _onnxruntime(path: str, threads: int, sentences: str | None = None) -> dict:
    """An ONNX sentence encoder (kompakt.export.onnx's directory): sentences/s at batch 1 and 32
    on the sentences and counts the transformers probe uses (kompakt.evaluate.sentence_speed's
    defaults), its own tokenizer, batched longest first as embed() batches."""
    from itertools import cycle, islice

    import onnxruntime

    from kompakt.evaluate import load_sentences
    from kompakt.evaluate.sentence_speed import BATCH, BATCH1_SENTENCES, BATCHED_SENTENCES
    from kompakt.export.onnx import MODEL_FILE
    from kompakt.export.onnx_speed import batched_rate, onnx_runner

    chosen = load_sentences(sentences).sentences
    single = list(islice(cycle(chosen), BATCH1_SENTENCES))
    many = list(islice(cycle(chosen), BATCHED_SENTENCES))
    started = time.perf_counter()
    run = onnx_runner(Path(path) / MODEL_FILE, threads)
    load_s = time.perf_counter() - started
    return {"backend": f"onnxruntime {onnxruntime.__version__} cpu", "load_s": load_s,
            "distinct_sentences": len(chosen), "batch1_sentences": len(single), "batched_sentences": len(many),
            "sentences_b1_per_s": batched_rate(run, single, 1, REPEATS),
            "sentences_b32_per_s": batched_rate(run, many, BATCH, REPEATS)}  # fmt: skip


BACKENDS = {"llamacpp": _llamacpp, "transformers": _transformers, "onnxruntime": _onnxruntime}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="transformers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sentences", help="a sentence encoder's timing sentences (a text file)")
    args = parser.parse_args(argv)
    result = BACKENDS[args.backend](args.model, args.threads, args.sentences)
    result.update(threads=args.threads, peak_rss_bytes=_peak_rss_bytes(), model=args.model,
                  prompt_tokens=PROMPT_TOKENS, gen_tokens=GEN_TOKENS)  # fmt: skip
    print(json.dumps(result))


def probe(model: str | Path, backend: str, threads: int | None = None, timeout: float = 600,
          sentences: list[str] | None = None) -> dict:  # fmt: skip
    """Run the probe in a fresh Python process; returns its JSON (or {"error": ...}). A sentence
    encoder is timed on `sentences` when given (one per line in a scratch file)."""
    import tempfile

    command = [sys.executable, "-m", "kompakt.report.probe", str(model), "--backend", backend]
    if threads:
        command += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="kompakt-probe-") as scratch:
        if sentences:
            listed = Path(scratch) / "sentences.txt"
            listed.write_text("\n".join(sentences) + "\n")
            command += ["--sentences", str(listed)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"probe timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"probe failed: {tail}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
