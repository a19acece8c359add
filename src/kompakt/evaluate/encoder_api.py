"""`evaluate` for sentence encoders: fidelity of the embeddings to a reference (the teacher),
speed in sentences/s, size and peak memory, on held-out sentences.

`kompakt.evaluate.evaluate` hands an encoder here (`is_encoder_pair` is the one seam); the
decoder metrics (perplexity, KL, top-1) mean nothing for a model that outputs one vector per
sentence. Student and teacher each embed the raw sentences with their own tokenizer, so a
student with another vocabulary or width is compared too (cosine needs the same width; recall
and Spearman do not, see kompakt.evaluate.embedding_fidelity).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kompakt.errors import ConfigError
from kompakt.evaluate.embedding_fidelity import DEFAULT_K, DEFAULT_PAIRS, embedding_fidelity
from kompakt.evaluate.memory import PeakMemory
from kompakt.evaluate.sentence_speed import SentenceSpeed, measure_sentence_speed
from kompakt.evaluate.sentences import DEFAULT_MAX_SENTENCES, SentenceSet, load_sentences
from kompakt.evaluate.size import disk_bytes, parameter_bytes, parameter_count
from kompakt.evaluate.speed import torch_threads
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

TRUNCATION_RULE = "kept the first tokens up to the limit (special tokens included)"


@dataclass
class Truncation:
    """How many sentences one model could not read whole (kompakt.model.encode's rule)."""

    model: str
    limit: int
    truncated: int


@dataclass
class EncoderEvalResult:
    """Everything `evaluate` measured on an encoder; `to_dict()` is JSON-ready and states the
    protocol (sentences, rule, k, pairs, threads)."""

    model: str
    data: str
    sentences: int
    sentence_rule: str
    parameters: int
    parameter_bytes: int
    disk_bytes: int | None
    peak_rss_bytes: int
    threads: int
    wall_s: float
    truncation: list[Truncation] = field(default_factory=list)
    reference: str | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    cosine_p05: float | None = None
    recall_at_k: float | None = None
    k: int | None = None
    queries: int | None = None
    spearman: float | None = None
    pairs: int | None = None
    speed: SentenceSpeed | None = None
    kind: str = "encoder"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def is_encoder_pair(candidate: LoadedModel, reference: LoadedModel | None) -> bool:
    """True when both are sentence encoders, False when both are causal LMs.

    Raises:
        ConfigError: one of each (embeddings cannot be compared with next-token distributions).
    """
    if reference is None or reference.is_encoder == candidate.is_encoder:
        return candidate.is_encoder
    encoder, decoder = (candidate, reference) if candidate.is_encoder else (reference, candidate)
    raise ConfigError(
        f"{encoder.name} is a sentence encoder but {decoder.name} is a causal LM; compare an encoder with an "
        "encoder (e.g. --reference all-minilm-l6-v2) and a causal LM with a causal LM"
    )


def truncation(loaded: LoadedModel, sentences: list[str]) -> Truncation:
    """How many of `sentences` are longer than the model's input limit."""
    from kompakt.model.encode import input_limit

    limit = input_limit(loaded)
    lengths = [len(ids) for ids in loaded.tokenizer(sentences, add_special_tokens=True)["input_ids"]]
    return Truncation(loaded.name, limit, sum(length > limit for length in lengths))


def _measure(candidate, reference, sentences: SentenceSet, k: int, pairs: int, result: EncoderEvalResult) -> None:
    from kompakt.model.encode import embed

    texts = sentences.sentences
    if reference is None:
        return
    if len(texts) <= k:
        raise ConfigError(
            f"neighbour recall@{k} needs more than {k} sentences, got {len(texts)}; pass a larger --data file"
        )
    fid = embedding_fidelity(embed(candidate, texts), embed(reference, texts), k=k, pairs=pairs)
    result.reference = reference.name
    result.cosine_mean, result.cosine_min, result.cosine_p05 = fid.cosine_mean, fid.cosine_min, fid.cosine_p05
    result.recall_at_k, result.k, result.queries = fid.recall_at_k, fid.k, fid.queries
    result.spearman, result.pairs = fid.spearman, fid.pairs
    if fid.cosine_mean is None:
        result.extra["cosine"] = "not defined: the two models embed into spaces of different widths"


def evaluate_encoder(
    candidate: LoadedModel,
    reference: LoadedModel | None = None,
    *,
    data: str | Path | None = None,
    max_sentences: int | None = None,
    k: int = DEFAULT_K,
    pairs: int = DEFAULT_PAIRS,
    speed: bool = True,
    threads: int | None = None,
) -> EncoderEvalResult:
    """Embedding fidelity to `reference` (when given), sentences/s, size and peak RSS of `candidate`.

    Sentences: `data` (kompakt.evaluate.sentences' rule) or the shipped held-out set; every
    sentence is a query for recall@k against all the others.

    Raises:
        ConfigError: an encoder paired with a causal LM; k not below the sentence count.
        DataError: a missing, empty or sentence-less data file.
    """
    is_encoder_pair(candidate, reference)
    if not candidate.is_encoder:
        raise ConfigError(f"{candidate.name} is a causal LM; evaluate it with kompakt.evaluate.evaluate")
    sentences = load_sentences(data, max_sentences or DEFAULT_MAX_SENTENCES)
    start = time.perf_counter()
    with torch_threads(threads) as used, PeakMemory() as memory:
        result = EncoderEvalResult(
            model=candidate.name, data=sentences.describe(), sentences=len(sentences.sentences),
            sentence_rule=sentences.rule, parameters=parameter_count(candidate.model),
            parameter_bytes=parameter_bytes(candidate.model), disk_bytes=disk_bytes(candidate.path),
            peak_rss_bytes=0, threads=used, wall_s=0.0,
        )  # fmt: skip
        _measure(candidate, reference, sentences, k, pairs, result)
        if speed:
            result.speed = measure_sentence_speed(candidate, sentences.sentences)
    models = [candidate] + ([reference] if reference is not None else [])
    result.truncation = [truncation(m, sentences.sentences) for m in models]
    result.peak_rss_bytes, result.wall_s = memory.peak_bytes, time.perf_counter() - start
    return result
