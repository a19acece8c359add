"""Write report.json, report.md and report.html of a run directory (each atomically): a recipe run
or a `--target` run, from the files in the directory alone."""

from __future__ import annotations

import json
from pathlib import Path

from kompakt.atomic import write_bytes
from kompakt.report.document import gather
from kompakt.report.render import markdown, page

ANALYSIS_PLOTS = ("layer_importance.png", "quant_sensitivity.png", "channel_importance.png")


def _images(report: dict) -> dict[str, bytes]:
    from kompakt.report.plots import trajectory_plot  # matplotlib: only for the HTML page

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


FORMATS = ("json", "md", "html")


def build_report(out: str | Path, formats: tuple[str, ...] = FORMATS) -> Path:
    """(Re)build the report files of the run in `out` from its saved data; returns the path of the
    last format written (report.html by default). The runner writes only "md" after each run
    (no plots, no matplotlib); `kompakt report` writes all three."""
    report = gather(out)
    run = Path(report["run_dir"])
    written = run
    for fmt in formats:
        written = run / f"report.{fmt}"
        if fmt == "json":
            write_bytes(written, json.dumps(report, indent=1, default=str).encode())
        elif fmt == "md":
            write_bytes(written, markdown(report).encode())
        else:
            write_bytes(written, page(report, _images(report)).encode())
    return written
