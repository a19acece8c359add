"""Output directory checks (before any work) and the analysis files (written with kompakt.atomic)."""

from __future__ import annotations

import os
from pathlib import Path

from kompakt.atomic import write_bytes
from kompakt.errors import OutputPathError


def check_out(out: str | Path | None) -> Path | None:
    """Validate an output directory without creating it.

    Raises:
        OutputPathError: `out` or one of its parents is an existing file, or the nearest
            existing parent directory is not writable.
    """
    if out is None:
        return None
    path = Path(out).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies inside the file {probe}"
        raise OutputPathError(f"output directory {path} {where}; choose a directory path with --out")
    if probe.exists() and not os.access(probe, os.W_OK):
        raise OutputPathError(f"cannot write into {probe}; choose a writable directory with --out")
    return path


def write_files(directory: Path, contents: dict[str, bytes]) -> None:
    """Write each name -> bytes into `directory` (created if needed); every file appears whole or
    not at all."""
    for name, data in contents.items():
        write_bytes(directory / name, data)
