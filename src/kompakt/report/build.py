"""Write report.json, report.md and report.html of a run directory (each atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from kompakt.atomic import write_bytes
from kompakt.report.document import gather
from kompakt.report.plots import trajectory_plot
from kompakt.report.render import markdown, page

ANALYSIS_PLOTS = ("layer_importance.png", "quant_sensitivity.png", "channel_importance.png")


def _images(report: dict) -> dict[str, bytes]:
    images: dict[str, bytes] = {}
    values = (report.get("comparison") or {}).get("values", {})
    plot = trajectory_plot(report["trajectory"], (values.get("size_bytes") or [None])[0])
    if plot is not None:
        images["trajectory.png"] = plot
    analysis = Path(report["analysis_dir"])
    for name in ANALYSIS_PLOTS:
        if (analysis / name).is_file():
            images[name] = (analysis / name).read_bytes()
    return images


def build_report(out: str | Path) -> Path:
    """(Re)build the report files of the run in `out` from its saved data; returns report.html's path."""
    report = gather(out)
    run = Path(report["run_dir"])
    write_bytes(run / "report.json", json.dumps(report, indent=1, default=str).encode())
    write_bytes(run / "report.md", markdown(report).encode())
    write_bytes(run / "report.html", page(report, _images(report)).encode())
    return run / "report.html"
