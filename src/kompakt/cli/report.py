"""`kompakt report RUN`: (re)build report.html / report.md / report.json of any compress run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import get_console

HELP = "Rebuild the HTML / Markdown / JSON report of a run directory (kompakt compress --target, --recipe or --step)."


def report_command(run: Path = typer.Argument(..., help="The run directory of kompakt compress.")) -> None:
    """Rebuild the report of a compress run from its saved measurements (nothing is re-run)."""
    from kompakt.report.build import build_report

    path = build_report(run)
    get_console().print(f"report: {path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("report", help=HELP)(report_command)
