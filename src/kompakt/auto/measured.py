"""Each attempt's predicted KL and bytes beside what the run measured (outcome.json and the
report's table), so a reader sees how far the planner's model is from the machine's numbers.

Measured KL: the attempt's last step, when the attempt finished all its steps (an attempt
abandoned earlier has no result to compare). Measured bytes: the written GGUF for the attempt
that was exported; for another finished attempt, the bytes export would write for its last
step's model (the same computation as the plan's, on the real model: kompakt.auto.gguf_bytes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kompakt.auto.planner import Plan
from kompakt.auto.predict import calibrated
from kompakt.rundir.lineage import read_lineage

logger = logging.getLogger(__name__)


def _file_bytes(step_dir: Path, export_type: str | None) -> int | None:
    from kompakt.auto.gguf_bytes import gguf_bytes
    from kompakt.model.load import load

    if export_type is None:
        return None
    sizes = gguf_bytes(load(step_dir), (export_type,))
    return None if sizes is None else sizes[export_type].total


def add_predicted_vs_measured(plan: Plan, outcomes: list[dict], delivered: int | None, exports: dict[str, str]) -> None:
    """Fill predicted_* / measured_* / calibrated_kl of every outcome (in place)."""
    for outcome in outcomes:
        index = outcome["attempt"] - 1
        attempt = plan.attempts[index]
        run_dir = Path(outcome["run_dir"])
        records = read_lineage(run_dir)
        finished = bool(records) and len(records) == len(attempt.steps)
        metrics = records[-1].get("metrics", {}) if finished else {}
        outcome.update(predicted_kl=attempt.predicted_kl, predicted_bytes=attempt.predicted_bytes, finished=finished,
                       measured_kl=metrics.get("kl_mean"), kl_top_k=metrics.get("kl_top_k"), measured_bytes=None)  # fmt: skip
        if index == delivered and "gguf" in exports:
            outcome["measured_bytes"] = Path(exports["gguf"]).stat().st_size
        elif finished:
            outcome["measured_bytes"] = _file_bytes(run_dir / records[-1]["dir"], plan.export_type_for(index))
    calibrated(outcomes)
