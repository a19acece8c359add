"""Evaluation: perplexity, fidelity to a reference (KL, top-1), speed, memory, size."""

from __future__ import annotations

import sys
import types

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


class _CallableModule(types.ModuleType):
    """`kompakt.evaluate` is both this package and the curated API function: importing the
    package rebinds the attribute `kompakt.evaluate` to the module, so the module is callable
    and `kompakt.evaluate(loaded, ...)` keeps meaning `evaluate(loaded, ...)`."""

    def __call__(self, *args, **kwargs) -> EvalResult:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
