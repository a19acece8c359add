"""Calibration: capture decoder-layer inputs and drive layer-by-layer passes (written once).

`run_sequential(model, blocks, process, ...)` is the driver every calibration-based pass uses
(SparseGPT / Wanda pruning, GPTQ, AWQ): see `kompakt.calib.sequential` for the protocol and
`kompakt.calib.stats.LinearStats` for what `process` receives per Linear.
"""

from __future__ import annotations

from kompakt.calib.capture import CapturedInputs, LayerCall, capture_layer_inputs, run_layer
from kompakt.calib.sequential import (
    SEQUENTIAL_GROUPS,
    LayerStats,
    Phase,
    ProcessFn,
    SequentialResult,
    collect_stats,
    run_sequential,
    sequential_groups,
)
from kompakt.calib.stats import LinearStats

__all__ = [
    "SEQUENTIAL_GROUPS",
    "CapturedInputs",
    "LayerCall",
    "LayerStats",
    "LinearStats",
    "Phase",
    "ProcessFn",
    "SequentialResult",
    "capture_layer_inputs",
    "collect_stats",
    "run_layer",
    "run_sequential",
    "sequential_groups",
]
