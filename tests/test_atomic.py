"""kompakt.atomic: whole-or-nothing writes with open()'s mode, and one-line errors on a full disk."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kompakt import atomic
from kompakt.errors import OutputPathError


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_directories_follow_the_umask(tmp_path, umask_022):
    atomic.write_text(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == 0o644
    with atomic.atomic_directory(tmp_path / "d") as temp:
        (temp / "inner.bin").write_bytes(b"1")
        private = temp / "private.bin"  # as a library using mkstemp would leave it
        private.write_bytes(b"2")
        os.chmod(private, 0o600)
    assert _mode(tmp_path / "d") == 0o755
    assert _mode(tmp_path / "d" / "inner.bin") == 0o644
    assert _mode(tmp_path / "d" / "private.bin") == 0o644
    os.umask(0o077)
    atomic.write_text(tmp_path / "b.txt", "x")
    assert _mode(tmp_path / "b.txt") == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as temp:
            temp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_directory_replace_swaps_whole(tmp_path):
    target = tmp_path / "model"
    with atomic.atomic_directory(target) as temp:
        (temp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target, replace=True) as temp:
            (temp / "v").write_text("2")
            raise RuntimeError("boom")
    assert (target / "v").read_text() == "1"
    with atomic.atomic_directory(target, replace=True) as temp:
        (temp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_without_replace_a_finished_directory_is_kept(tmp_path):
    target = tmp_path / "cache-entry"
    with atomic.atomic_directory(target) as temp:
        (temp / "v").write_text("mine")
        target.mkdir()
        (target / "v").write_text("theirs")
    assert (target / "v").read_text() == "theirs"


def test_os_error_becomes_one_line_naming_path_and_bytes(tmp_path):
    target = tmp_path / "big.bin"
    with pytest.raises(OutputPathError) as caught:
        with atomic.atomic_file(target, expected_bytes=5_000_000) as temp:
            temp.write_bytes(b"x" * 10)
            raise OSError(28, "No space left on device")
    message = str(caught.value)
    assert "\n" not in message and str(target) in message and "5.0 MB" in message and "free" in message
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_symlink_replaced_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    atomic.atomic_symlink(tmp_path / "final", "a")
    atomic.atomic_symlink(tmp_path / "final", "b")
    assert os.readlink(tmp_path / "final") == "b"


def _limit_file_size() -> None:
    # A real write error from the kernel: past RLIMIT_FSIZE write() fails with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.parametrize("argv", [
    ["--format", "gguf", "--type", "f16", "--out", "{out}/m.gguf"],
    ["--format", "hf", "--out", "{out}/hf"],
])  # fmt: skip
def test_cli_export_on_a_full_filesystem_is_one_line_exit_2(tmp_path, argv):
    from kompakt.model.tiny import save_tiny

    save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("{out}", str(out)) for a in argv]
    env = {**os.environ, "KOMPAKT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "kompakt", "export", str(tmp_path / "tiny"), *args],
        capture_output=True, text=True, env=env, preexec_fn=_limit_file_size, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and str(out) in lines[0], done.stderr
    assert list(out.iterdir()) == []  # nothing half-written


def test_a_read_error_inside_the_block_is_not_called_a_write_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic.atomic_file(tmp_path / "out" / "copy.bin") as temp:
            temp.write_bytes(Path(tmp_path / "missing-input.bin").read_bytes())
    assert list((tmp_path / "out").iterdir()) == []


def test_reporting_errors_for_appends_and_filled_directories(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(OutputPathError, match=r"no space left writing .*run.*the run keeps its finished steps"):
        with atomic.reporting_errors(run, after="the run keeps its finished steps"):
            raise OSError(28, "No space left on device", str(run / "lineage.jsonl"))
    with pytest.raises(PermissionError):  # about another file: not this write's error
        with atomic.reporting_errors(run):
            raise PermissionError(13, "Permission denied", "/etc/shadow")


def test_umask_is_read_without_changing_it(umask_022):
    assert atomic.umask() == 0o022
    assert os.umask(0o022) == 0o022
