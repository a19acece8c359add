"""The trajectory: one row per evaluated model (the original as step 0, then every step), read
from a run directory and written as a table. report.md / report.html of every run (a recipe run
and a `--target` run alike) and the live table of `kompakt compress` use these functions, so
the three show the same columns with the same formatting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kompakt.rundir.layout import RUN_FILE
from kompakt.rundir.lineage import read_lineage

COLUMNS = ["attempt", "step", "pass", "params", "size", "ppl", "ppl ratio", "KL", "top-1",
           "prefill tok/s", "gen tok/s", "cosine", "recall@10", "spearman", "sent/s",
           "time s", "summary"]  # fmt: skip
ALWAYS = ("step", "pass")


def entry(record: dict[str, Any], attempt: int | None = None) -> dict[str, Any]:
    """One trajectory row (JSON-able) from a lineage record or the runner's baseline row."""
    m = record.get("metrics", {})
    return {
        "attempt": attempt, "step": record["index"], "pass": record["pass"],
        "parameters": record.get("parameters"), "bytes": record.get("bytes"),
        "ppl": m.get("ppl"), "ppl_reference": m.get("ppl_reference"), "ppl_ratio": m.get("ppl_ratio"),
        "kl": m.get("kl_mean"), "top1": m.get("top1"), "prefill_tps": m.get("prefill_tps"),
        "generate_tps": m.get("generate_tps"), "cosine": m.get("cosine_mean"), "recall": m.get("recall_at_10"),
        "spearman": m.get("spearman"), "sentences_per_s": m.get("sentences_per_s"), "wall_s": record.get("wall_s"), "summary": record.get("summary", ""),
    }  # fmt: skip


def read_run(run_dir: Path, attempt: int | None = None) -> list[dict[str, Any]]:
    """The rows of one recipe run: its baseline (from run.json, when the run got that far) and steps."""
    rows = []
    try:
        baseline = json.loads((Path(run_dir) / RUN_FILE).read_text()).get("baseline")
    except (OSError, ValueError):
        baseline = None
    if baseline:
        rows.append(entry(baseline, attempt))
    return rows + [entry(record, attempt) for record in read_lineage(run_dir)]


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _with_reference(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The original's own perplexity (measured beside the first step) goes into its row 0."""
    out = []
    for row in rows:
        if row["step"] == 0 and row["ppl"] is None:
            same = [r for r in rows if r["attempt"] == row["attempt"] and r.get("ppl_reference") is not None]
            if same:
                row = {**row, "ppl": same[0]["ppl_reference"], "ppl_ratio": 1.0}
        out.append(row)
    return out


def _cells(row: dict[str, Any], base_params: int | None) -> list[str]:
    params = row.get("parameters")
    share = f" ({params / base_params:.0%})" if params and base_params else ""
    size = row.get("bytes")
    return [
        _fmt(row.get("attempt")), str(row["step"]), row["pass"], f"{params / 1e6:.2f} M{share}" if params else "",
        f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "", _fmt(row.get("ppl")),
        _fmt(row.get("ppl_ratio"), ".3f"), _fmt(row.get("kl"), ".4f"), _fmt(row.get("top1"), ".1%"),
        _fmt(row.get("prefill_tps"), ".0f"), _fmt(row.get("generate_tps"), ".1f"), _fmt(row.get("cosine"), ".4f"),
        _fmt(row.get("recall"), ".3f"), _fmt(row.get("spearman"), ".3f"), _fmt(row.get("sentences_per_s"), ".0f"),
        _fmt(row.get("wall_s"), ".1f"),
        row.get("summary") or "",
    ]  # fmt: skip


def rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Every column of every row as text (parameter shares relative to the attempt's step 0)."""
    entries = _with_reference(entries)
    bases = {r["attempt"]: r.get("parameters") for r in entries if r["step"] == 0}
    first = next(iter(bases.values()), None)  # a later attempt's own step 0 is not repeated
    return [_cells(r, bases.get(r["attempt"], first)) for r in entries]


def table(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows, without the columns that are empty in every row."""
    cells = rows(entries)
    keep = [i for i, name in enumerate(COLUMNS) if name in ALWAYS or any(row[i] for row in cells)]
    return [COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in cells]
