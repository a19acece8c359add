"""Run an exported ONNX encoder as a user would: its own tokenizer, then onnxruntime.

    onnx_embed("enc-onnx/model.onnx", sentences)                     # -> np.ndarray [n, dim]
    onnx_speed("enc-onnx/model.onnx", sentences, batch_size=32)      # -> sentences/s

End to end: the directory's tokenizer (truncating at its model_max_length, which the export sets
to kompakt's input limit) plus the session. onnx_speed batches the sentences longest first, as
kompakt's embed() (whose speed it is compared with) and sentence-transformers' encode() do: in
input order the padding alone made WikiText sentences 1.7x slower at batch 32, which is the
batching's cost, not the runtime's. It runs one batch of warm-up untimed.
Compare two files (fp32 and int8) in the same process, one after the other, and report the
ratio: an absolute number on a shared machine says little (DESIGN.md, "Quality and speed are
measured").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kompakt.errors import ConfigError


def onnx_embed(onnx_path: str | Path, sentences: list[str], batch_size: int = 32, *,
               threads: int | None = None) -> np.ndarray:  # fmt: skip
    """The `sentence_embedding` output for `sentences` [n, dim] (float32), in their order."""
    run = onnx_runner(onnx_path, threads)
    if not sentences:
        raise ConfigError("onnx_embed needs at least one sentence")
    return np.concatenate([run(sentences[i : i + batch_size]) for i in range(0, len(sentences), max(1, batch_size))])


def onnx_speed(onnx_path: str | Path, sentences: list[str], batch_size: int, *, threads: int | None = None,
               repeats: int = 1) -> float:  # fmt: skip
    """Sentences per second over `sentences` in batches of `batch_size` (best of `repeats` passes).

    Args:
        onnx_path: model.onnx inside an export directory (its tokenizer files beside it).
        threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
    """
    return batched_rate(onnx_runner(onnx_path, threads), sentences, batch_size, repeats)


def batched_rate(run: Callable[[list[str]], np.ndarray], sentences: list[str], batch_size: int,
                 repeats: int = 1) -> float:  # fmt: skip
    """onnx_speed for a runner already loaded (kompakt.report.probe times two batch sizes on one)."""
    if batch_size < 1 or not sentences:
        raise ConfigError("onnx_speed needs at least one sentence and a batch size of 1 or more")
    ordered = sorted(sentences, key=len, reverse=True)  # the order embed() batches in
    run(ordered[:batch_size])  # warm-up: onnxruntime allocates its arenas on the first run
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for start in range(0, len(ordered), batch_size):
            run(ordered[start : start + batch_size])
        best = min(best, time.perf_counter() - started)
    return len(sentences) / best


def onnx_runner(onnx_path: str | Path, threads: int | None = None) -> Callable[[list[str]], np.ndarray]:
    """A function from a batch of sentences to their embeddings, tokenizer and session loaded once."""
    from transformers import AutoTokenizer

    from kompakt.export.onnx import OUTPUTS
    from kompakt.export.onnx_check import session

    onnx_path = Path(onnx_path)
    tokenizer = AutoTokenizer.from_pretrained(onnx_path.parent)
    runner = session(onnx_path, threads)
    names = [i.name for i in runner.get_inputs()]

    def run(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, return_tensors="np")
        return runner.run([OUTPUTS[0]], {name: encoded[name] for name in names})[0]

    return run
