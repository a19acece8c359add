"""Evaluation: perplexity, fidelity to a reference (KL, top-1), speed, memory, size."""

from __future__ import annotations

from kompakt.callable_package import make_package_callable
from kompakt.evaluate.api import EvalResult, evaluate
from kompakt.evaluate.fidelity import FidelityResult, fidelity
from kompakt.evaluate.memory import PeakMemory, peak_rss
from kompakt.evaluate.perplexity import PerplexityResult, perplexity
from kompakt.evaluate.size import disk_bytes, parameter_bytes, parameter_count
from kompakt.evaluate.speed import SpeedResult, measure_speed

__all__ = [
    "EvalResult",
    "FidelityResult",
    "PeakMemory",
    "PerplexityResult",
    "SpeedResult",
    "disk_bytes",
    "evaluate",
    "fidelity",
    "measure_speed",
    "parameter_bytes",
    "parameter_count",
    "peak_rss",
    "perplexity",
]


make_package_callable(__name__, evaluate)  # kompakt.evaluate(...) after `import kompakt.evaluate`
