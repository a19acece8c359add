"""Bench result files that grow row by row and can be filled by several runs.

A bench writes its JSON after every row (a killed run keeps what it measured) and, with
`merge=True`, keeps the rows an earlier run of the same protocol wrote, replacing rows of the
same name. So the expensive groups of a bench (or a peer run in another environment) can be
run separately, even at the same time, into one file: every write re-reads the file under a
lock and merges, so two runs never drop each other's rows.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from kompakt.atomic import atomic_file


class ResultsFile:
    """`add(row)` merges one row by name and rewrites the file atomically."""

    def __init__(self, path: Path, header: dict[str, Any], merge: bool) -> None:
        self.path = Path(path)
        self.header = header
        self.merge = merge
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["name"] != row["name"]] + [row]
        self.write()

    def read(self) -> dict[str, Any]:
        """The file as it is now (all runs' rows)."""
        return json.loads(self.path.read_text()) if self.path.is_file() else {"rows": self.rows}

    def previous_row(self, name: str) -> dict[str, Any] | None:
        """A row an earlier run of this protocol wrote (None when there is none)."""
        data = self._previous()
        return next((dict(r) for r in data.get("rows", []) if r["name"] == name), None)

    def set(self, key: str, value: Any) -> None:
        self.header[key] = value
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = {**self._previous(), **self.header}
            mine = {r["name"] for r in self.rows}
            kept = [r for r in data.get("rows", []) if r["name"] not in mine] if self.merge else []
            data["rows"] = _ordered(kept + self.rows)
            with atomic_file(self.path) as tmp:  # never a half-written result
                tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")

    def _previous(self) -> dict[str, Any]:
        if not self.merge or not self.path.is_file():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("protocol") != self.header.get("protocol"):
            raise SystemExit(f"{self.path} holds another protocol ({data.get('protocol')}); drop --merge or --out elsewhere")
        return data


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baseline rows first (order "order" when a bench gives one), then the rest as written."""
    return sorted(rows, key=lambda r: r.get("order", 1_000))
