"""Identities of steps and data, so a rerun can tell which finished steps it may skip.

A step's identity chains its input: hash(previous step hash or the original model's
fingerprint, pass name, resolved config, data identity, seed). Two runs with the same model,
steps, data and seed produce the same hashes, whatever the machine or the directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any, length: int = 16) -> str:
    """Short sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def file_identity(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes, or of every file under a directory (relative names included);
    None stays None (self-generated data). A missing path hashes its name (the loader will
    report it)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*") if p.is_file())
    else:
        return digest({"missing": str(path)})
    sha = hashlib.sha256()
    for name, item in files:
        sha.update(name.encode() + b"\0")
        with item.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
    return sha.hexdigest()[:16]


def step_hash(input_id: str, pass_name: str, config: dict, data_id: str | None, seed: int) -> str:
    """Identity of one step's result."""
    return digest({"input": input_id, "pass": pass_name, "config": config, "data": data_id, "seed": seed})
