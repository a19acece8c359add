"""Run-directory lineage: `lineage.jsonl`, one JSON line per finished step.

Lines are appended whole, flushed and fsynced; a torn last line (a kill mid-write) is
dropped on the next read and cut off before the next append, so the file is always a
sequence of complete records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kompakt.atomic import reporting_errors
from kompakt.errors import OutputPathError

LINEAGE = "lineage.jsonl"


def read_lineage(run_dir: Path) -> list[dict[str, Any]]:
    """The complete records of a run's lineage (a torn or unreadable last line is ignored)."""
    path = Path(run_dir) / LINEAGE
    if not path.exists():
        return []
    records = []
    data = path.read_bytes()
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):  # the last piece is "" or torn
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise OutputPathError(
                f"{path} line {number} is not valid JSON; use a new --out, or --force to start over"
            ) from None
    return records


def _cut_torn_tail(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record as a complete line, flushed and fsynced."""
    path = Path(run_dir) / LINEAGE
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with reporting_errors(path, after="the lineage keeps its complete lines; rerun to resume"):
        if path.exists():
            _cut_torn_tail(path)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
