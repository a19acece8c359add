"""sha256 manifests written beside every export, in the format `sha256sum -c` reads.

- a file `model.gguf` gets `model.gguf.sha256` with one line `<hex>  model.gguf`;
- a directory `out/` gets `out/SHA256SUMS` listing every file under it (relative paths,
  sorted), so `cd out && sha256sum -c SHA256SUMS` checks the whole export.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kompakt.atomic import atomic_file

DIRECTORY_MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(path: str | Path) -> Path:
    """Where the manifest of `path` lives (beside a file, inside a directory)."""
    path = Path(path)
    return path / DIRECTORY_MANIFEST if path.is_dir() else path.with_name(path.name + ".sha256")


def write_manifest(path: str | Path) -> Path:
    """Write the sha256 manifest of a file or a directory (atomically); returns its path."""
    path = Path(path)
    target = manifest_path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p != target and not p.name.startswith("."))
        lines = [f"{sha256_file(p)}  {p.relative_to(path).as_posix()}" for p in files]
    else:
        lines = [f"{sha256_file(path)}  {path.name}"]
    with atomic_file(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def verify_manifest(path: str | Path) -> list[str]:
    """Names of files whose sha256 differs from (or is missing against) the manifest; [] = intact."""
    path = Path(path)
    target = manifest_path(path)
    base = path if path.is_dir() else path.parent
    bad = []
    for line in target.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, name = line.split("  ", 1)
        file = base / name
        if not file.is_file() or sha256_file(file) != digest:
            bad.append(name)
    return bad
