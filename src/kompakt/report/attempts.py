"""The table of a --target run's attempts: what the plan predicted (KL, bytes) beside what the
run measured, so the planner's model can be judged on every run (outcome.json, filled by
kompakt.auto.measured), and which KL the numbers are."""

from __future__ import annotations

from typing import Any

HEADER = ["attempt", "runs", "status", "predicted KL", "calibrated KL", "measured KL", "predicted size",
          "measured size"]  # fmt: skip


def _kl(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def _size(value: Any) -> str:
    return "—" if value is None else f"{value / 1e6:.4g} MB"


def rows(report: dict) -> list[list[str]]:
    """One row per attempt that ran (none for a recipe run)."""
    out = []
    for outcome in report.get("outcomes") or []:
        if "predicted_kl" not in outcome:  # a run made before predictions were recorded
            continue
        out.append([str(outcome["attempt"]), outcome.get("label", ""), outcome.get("status", ""),
                    _kl(outcome.get("predicted_kl")), _kl(outcome.get("calibrated_kl")), _kl(outcome.get("measured_kl")),
                    _size(outcome.get("predicted_bytes")), _size(outcome.get("measured_bytes"))])  # fmt: skip
    return out


def notes(report: dict) -> list[str]:
    """What the columns are."""
    top_k = next((o.get("kl_top_k") for o in report.get("outcomes") or [] if o.get("kl_top_k")), None)
    kind = (f"KL over the original's top-{top_k} tokens plus the rest as one bucket (a lower bound of the "
            "full-vocabulary KL: within ~3-4 % on the embedded models; `kompakt eval` measures the full one)"
            if top_k else "KL over the full vocabulary")  # fmt: skip
    return [
        f"measured KL: the attempt's last step on the held-out text, {kind}; — when the attempt stopped early",
        "predicted KL: the light analysis (per-layer 4-bit rounding summed, times the method's share; "
        "kompakt.auto.predict); calibrated: times measured / predicted of the last finished attempt before it",
        "sizes: the GGUF file (predicted from the export's tensor plan and header; measured: the written file, "
        "or for an attempt not exported, the same computation on its model)",
    ]
