"""Every file and directory kompakt writes appears whole or not at all (the one helper).

A write goes to a temporary name in the target's own directory (so the rename cannot cross a
filesystem), is flushed and fsynced, renamed over the target, and the directory is fsynced so
the rename survives a power cut. On any error the temporary is removed and the target is left
as it was. Files get the mode `open()` would give (0666 less the umask; `mkstemp` alone would
leave 0600, which a server running as another user cannot read).

An `OSError` while writing (full disk, quota, read-only filesystem, permissions) becomes one
`OutputPathError` naming the path, the bytes written or needed and the bytes free, so the CLI
prints one line and exits 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from kompakt.errors import OutputPathError


def umask() -> int:
    """The process umask. Read from /proc where it is shown: `os.umask` can only read it by
    setting it, and a file another thread creates in that instant would get mode 0666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(target: str | Path, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target` that replaces `target` when the block succeeds.

    The block writes the temporary path (by name: gguf writers, `shutil.copyfile`, ...).

    Raises:
        OutputPathError: the write failed with an OSError (full disk, permissions, ...).
    """
    target = Path(target)
    _make_parent(target)
    with _reporting_errors(target, expected_bytes):
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    temp = Path(name)
    try:
        with _reporting_errors(target, expected_bytes, temp):
            os.chmod(temp, 0o666 & ~umask())
            yield temp
            # A writer that replaced the file (safetensors writes its own private temporary
            # file and renames it) leaves mode 0600: give it open()'s mode again.
            os.chmod(temp, 0o666 & ~umask())
            _fsync_path(temp)
            os.replace(temp, target)
            fsync_directory(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    write_bytes(target, text.encode("utf-8"))


def write_bytes(target: str | Path, data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_file(target, expected_bytes=len(data)) as temp:
        temp.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, replace: bool = False,
                     expected_bytes: int | None = None) -> Iterator[Path]:  # fmt: skip
    """Yield a fresh temporary directory that becomes `target` when the block succeeds.

    Args:
        replace: an existing `target` is renamed aside, the new one renamed in, then the old one
            removed (restored on failure), so `target` is always the old or the new complete
            directory. Without `replace`, an existing `target` that another process finished
            first is kept and ours is discarded (both are complete: a cache entry).
        expected_bytes: the size of what will be written, named in a full-disk error.
    """
    target = Path(target)
    _make_parent(target)
    with _reporting_errors(target, expected_bytes):
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _reporting_errors(target, expected_bytes, temp):
            os.chmod(temp, 0o777 & ~umask())  # mkdtemp makes it private; look like mkdir's
            yield temp
            _fix_modes(temp)
            _fsync_tree(temp)
            if replace:
                _swap_in(temp, target)
            else:
                _rename_unless_done(temp, target)
            fsync_directory(target.parent)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def atomic_symlink(link: str | Path, target: str) -> None:
    """Point `link` at `target` (relative), replacing an existing link atomically."""
    link = Path(link)
    temp = link.parent / f".{link.name}.{uuid.uuid4().hex[:8]}.tmp"
    with _reporting_errors(link, None, temp):
        os.symlink(target, temp)
        os.replace(temp, link)
        fsync_directory(link.parent)


def fsync_directory(directory: str | Path) -> None:
    """fsync a directory so a rename in it is durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(f"{target.parent} is a file; choose a path inside a directory") from None
    except OSError as error:
        raise OutputPathError(f"cannot create {target.parent} ({error.strerror}); choose a writable path") from None


@contextlib.contextmanager
def reporting_errors(path: str | Path, *, expected_bytes: int | None = None,
                     after: str = "nothing was written") -> Iterator[None]:  # fmt: skip
    """Turn a failed write under `path` (a file or a directory) inside the block into one
    OutputPathError; for writes that cannot be atomic (appending a lineage line, filling a
    directory that already exists). `after` says what state the failure leaves behind."""
    path = Path(path)
    with _reporting_errors(path, expected_bytes, None, within=path, after=after):
        yield


@contextlib.contextmanager
def _reporting_errors(target: Path, expected: int | None, temp: Path | None = None, *,
                      within: Path | None = None, after: str = "nothing was written") -> Iterator[None]:  # fmt: skip
    """Turn an OSError of writing `target` (or `temp`, or anything `within`) into one OutputPathError.

    Other errors pass unchanged: a read error of the block's input names its own file, and is not
    this write's fault.
    """
    try:
        yield
    except OutputPathError:
        raise
    except Exception as error:  # noqa: BLE001 - only write errors are turned into one line, see below
        os_error = _as_os_error(error)
        places = [p for p in (target, temp, within) if p is not None]
        if os_error is None or not _is_write_error(os_error, places):
            raise
        raise _write_error(target, os_error, expected, temp, after) from None


def _as_os_error(error: Exception) -> OSError | None:
    """The OSError behind `error`: itself, or the one safetensors' Rust writer only names in its
    message as "(os error N)"."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"os error (\d+)", str(error)) if type(error).__name__ == "SafetensorError" else None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _is_write_error(error: OSError, places: list[Path]) -> bool:
    """Out of space (only a write runs out of it), or an error naming a file at one of `places`."""
    if _out_of_space(error):
        return True
    named = [Path(os.fsdecode(n)) for n in (error.filename, error.filename2) if n is not None]
    return any(_inside(name, place) for name in named for place in places)


def _inside(name: Path, place: Path) -> bool:
    """`name` is `place`, inside it, its directory, or beside it (where its temporary lives)."""
    name, place = Path(os.path.abspath(name)), Path(os.path.abspath(place))
    return name == place or place in name.parents or place.parent in (name, name.parent)


def _write_error(target: Path, error: OSError, expected: int | None, temp: Path | None,
                 after: str = "nothing was written") -> OutputPathError:  # fmt: skip
    free = _free_bytes(target if target.is_dir() else target.parent)
    if _out_of_space(error):
        written = _tree_bytes(temp) if temp is not None and temp.exists() else 0
        need = f"needs {_human(expected)}" if expected else f"needs more than the {_human(written)} written"
        return OutputPathError(
            f"no space left writing {target}: it {need}, {_human(free)} free there; "
            f"free some space or choose another output path ({after})"
        )
    reason = error.strerror or str(error)
    return OutputPathError(f"cannot write {target} ({reason}); choose a writable output path ({after})")


def _out_of_space(error: OSError) -> bool:
    # A short write (the device filled mid-buffer) reaches Python as an OSError without errno.
    short_write = error.errno is None and "written" in str(error)
    return short_write or error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def check_room(target: str | Path, needed: int) -> None:
    """Refuse before writing `target` when its filesystem has fewer than `needed` bytes free, so a
    long export or save fails at once instead of hours later with a full disk (the old file a
    `--force` replaces still takes its room until the rename). Unknown free space passes.

    Raises:
        OutputPathError: one line with the bytes needed and free.
    """
    place = Path(target).expanduser().absolute().parent
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return
    if free < needed:
        raise OutputPathError(
            f"no room for {target}: it needs about {_human(needed)}, {_human(free)} free there; "
            "free some space or choose another output path (nothing was written)"
        )


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _human(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fix_modes(root: Path) -> None:
    """Files a library made with mkstemp inside the temporary directory get open()'s mode too."""
    file_mode, dir_mode = 0o666 & ~umask(), 0o777 & ~umask()
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        mode = dir_mode if path.is_dir() else file_mode
        if path.stat().st_mode & 0o777 != mode and path.stat().st_mode & 0o777 & ~mode == 0:
            os.chmod(path, mode)  # only widen a private file (0600) to the umask's mode


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_path(path)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        fsync_directory(directory)


def _swap_in(temp: Path, target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        os.replace(temp, target)
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputPathError(f"{target} exists and is not a directory; remove it or choose another path")
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, aside)
    try:
        os.replace(temp, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _rename_unless_done(temp: Path, target: Path) -> None:
    try:
        os.rename(temp, target)
    except OSError:
        if not target.is_dir():
            raise
