"""Sentences per second of a sentence encoder at batch 1 and batch 32, threads and backend stated.

Protocol: the whole path a user calls, `kompakt.model.encode.embed` (tokenize, forward, pool,
normalise), on real sentences (the evaluation's own, so lengths are realistic): the first
`batch1_sentences` one at a time (the latency case: a search query), and the first
`batched_sentences` in batches of `batch_size` (the indexing case). One warm-up of each, then
the best of `repeats` timings, since a shared machine only ever slows a run down. Absolute
numbers depend on the machine: compare them as ratios measured in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from itertools import cycle, islice

import torch

from kompakt.errors import DataError
from kompakt.evaluate.speed import torch_threads
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

BATCH = 32  # the indexing case's batch size
BATCH1_SENTENCES = 64  # timed one at a time (the latency case)
BATCHED_SENTENCES = 256  # timed in batches of BATCH


@dataclass
class SentenceSpeed:
    """Sentences/s of one encoder; `to_dict()` is JSON-ready."""

    batch1_per_s: float
    batched_per_s: float
    batch_size: int
    threads: int
    backend: str
    dtype: str
    batch1_sentences: int
    batched_sentences: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def best_rate(run, count: int, repeats: int) -> float:
    """`count` / the fastest of `repeats` timed calls of `run()`, after one untimed warm-up call."""
    run()  # warm-up: first-call allocations and lazy initialisation are not part of the rate
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def measure_sentence_speed(
    loaded: LoadedModel,
    sentences: list[str],
    *,
    threads: int | None = None,
    batch_size: int = BATCH,
    batch1_sentences: int = BATCH1_SENTENCES,
    batched_sentences: int = BATCHED_SENTENCES,
    repeats: int = 2,
) -> SentenceSpeed:
    """Sentences/s of `loaded` at batch 1 and at `batch_size` on `sentences` (reused in order
    when there are fewer than asked for)."""
    from kompakt.model.encode import embed

    if not sentences:
        raise DataError("speed needs at least one sentence; pass a file with sentences in it")
    single = list(islice(cycle(sentences), batch1_sentences))
    many = list(islice(cycle(sentences), batched_sentences))

    def one_at_a_time() -> None:
        for sentence in single:
            embed(loaded, [sentence], batch_size=1)

    with torch_threads(threads) as used:
        rate1 = best_rate(one_at_a_time, len(single), repeats)
        rate_n = best_rate(lambda: embed(loaded, many, batch_size=batch_size), len(many), repeats)
    device = loaded.device
    result = SentenceSpeed(
        batch1_per_s=rate1,
        batched_per_s=rate_n,
        batch_size=batch_size,
        threads=used,
        backend=f"torch {torch.__version__.split('+')[0]} {device.type}",
        dtype=str(loaded.compute_dtype).removeprefix("torch."),
        batch1_sentences=len(single),
        batched_sentences=len(many),
        repeats=repeats,
    )
    logger.info("speed: %.1f sentences/s at batch 1, %.1f at batch %d", rate1, rate_n, batch_size)
    return result
