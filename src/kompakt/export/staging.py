"""An export is written and checked beside where it goes, and only then put there.

`kompakt export --force` must not trade a good file for a broken one: the new export is
written into a hidden directory inside the destination directory (the same filesystem, so
every move is a rename), checked there, and renamed over the old one only when it passed. A
rejected export is renamed `<name>.rejected` in the destination instead (replacing an older
rejected one) and the old export is left as it was. Whatever is still staged when the block
ends (an error, Ctrl-C) is removed, so nothing half-written remains.

    with Stage(out.parent, out.name) as stage:
        write(stage.path(out.name))
        stage.publish([out.name])          # or, when its check failed: reject(..., into=out.parent)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kompakt.atomic import atomic_directory, fsync_directory
from kompakt.errors import OutputPathError

REJECTED = ".rejected"


class Stage:
    """A hidden temporary directory in `destination`; its entries carry the names they are
    published under. An OutputPathError raised inside the block (a full disk) names the
    destination paths, not the staged ones."""

    def __init__(self, destination: Path, label: str) -> None:
        self.destination = Path(destination)
        try:
            self.destination.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=f".{label}.", suffix=".staged", dir=self.destination))
        except OSError as error:
            raise OutputPathError(
                f"cannot write in {self.destination} ({error.strerror}); choose a writable --out"
            ) from None

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        shutil.rmtree(self.root, ignore_errors=True)
        if isinstance(error, OutputPathError) and str(self.root) in str(error):
            raise OutputPathError(str(error).replace(str(self.root), str(self.destination))) from None
        return False

    def path(self, name: str) -> Path:
        return self.root / name

    def publish(self, names: list[str], stale: tuple[str, ...] = ()) -> None:
        """Rename the staged `names` into the destination in this order, replacing what is there
        (a directory is swapped in whole); remove the `stale` names that were not staged (what an
        older export left that would describe the wrong file, e.g. its verify.json)."""
        try:
            for name in names:
                staged, target = self.root / name, self.destination / name
                if staged.is_dir():
                    with atomic_directory(target, replace=True) as temp:
                        os.replace(staged, temp)  # onto the helper's empty directory: a rename
                else:
                    os.replace(staged, target)
            for name in stale:
                if name not in names:
                    (self.destination / name).unlink(missing_ok=True)
        except OSError as error:
            raise OutputPathError(
                f"cannot put the export in place in {self.destination} ({error.strerror or error}); "
                "choose another --out"
            ) from None
        fsync_directory(self.destination)


def move_replacing(source: Path, target: Path) -> Path:
    """Rename `source` to `target`, removing whatever `target` is first (a file, a directory, a
    link); an OS error is one OutputPathError line. Returns `target`."""
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(source, target)
    except OSError as error:
        raise OutputPathError(
            f"cannot move {source.name} to {target} ({error.strerror or error}); remove {target} and retry"
        ) from None
    return target
