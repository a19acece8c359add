"""The user cache (converted GGUF models, assembled embedded files, generated data).

`$KOMPAKT_CACHE` overrides the default `~/.cache/kompakt`. Entries are written with
kompakt.atomic, so a crash or an error never leaves a half-written entry that a later run
would trust.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The kompakt cache root ($KOMPAKT_CACHE or ~/.cache/kompakt); created on first use."""
    root = Path(os.environ.get("KOMPAKT_CACHE") or Path.home() / ".cache" / "kompakt").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(*parts: str) -> Path:
    """A sub-directory of the cache (created), e.g. cache_subdir("models")."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
