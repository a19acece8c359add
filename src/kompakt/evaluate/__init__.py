"""Evaluation: perplexity, fidelity to a reference (KL, top-1), speed, memory, size; for sentence
encoders, embedding fidelity (cosine, neighbour recall@k, Spearman) and sentences/s."""

from __future__ import annotations

from kompakt.callable_package import make_package_callable
from kompakt.evaluate.api import EvalResult, evaluate
from kompakt.evaluate.embedding_fidelity import EmbeddingFidelity, embedding_fidelity
from kompakt.evaluate.encoder_api import EncoderEvalResult, evaluate_encoder
from kompakt.evaluate.fidelity import FidelityResult, fidelity
from kompakt.evaluate.memory import PeakMemory, peak_rss
from kompakt.evaluate.perplexity import PerplexityResult, perplexity
from kompakt.evaluate.size import disk_bytes, parameter_bytes, parameter_count
from kompakt.evaluate.sentence_speed import SentenceSpeed, measure_sentence_speed
from kompakt.evaluate.sentences import SentenceSet, load_sentences
from kompakt.evaluate.speed import SpeedResult, measure_speed

__all__ = [
    "EmbeddingFidelity",
    "EncoderEvalResult",
    "EvalResult",
    "FidelityResult",
    "PeakMemory",
    "PerplexityResult",
    "SentenceSet",
    "SentenceSpeed",
    "SpeedResult",
    "disk_bytes",
    "embedding_fidelity",
    "evaluate",
    "evaluate_encoder",
    "fidelity",
    "load_sentences",
    "measure_sentence_speed",
    "measure_speed",
    "parameter_bytes",
    "parameter_count",
    "peak_rss",
    "perplexity",
]


make_package_callable(__name__, evaluate)  # kompakt.evaluate(...) after `import kompakt.evaluate`
