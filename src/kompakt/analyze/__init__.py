"""Phase 1: analyse a model — where its parameters and bytes are, which layers, heads and MLP
channels matter, how sensitive each layer is to quantization, how good and fast it is now."""

from __future__ import annotations

from kompakt.analyze.api import analyze, write_outputs
from kompakt.analyze.encoder import analyze_encoder
from kompakt.analyze.result import Analysis
from kompakt.callable_package import make_package_callable

__all__ = ["Analysis", "analyze", "analyze_encoder", "write_outputs"]

make_package_callable(__name__, analyze)  # kompakt.analyze(...) after `import kompakt.analyze`
