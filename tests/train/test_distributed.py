"""Under `accelerate launch` only process 0 writes the run directory; single-process runs are unchanged."""

from __future__ import annotations

from pathlib import Path

from kompakt.train.distributed import process_index, run_dir_for_process


def test_process_zero_writes_the_run_directory(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert process_index() == 0 and run_dir_for_process(Path("/runs/heal")) == Path("/runs/heal")
    monkeypatch.setenv("RANK", "3")
    assert process_index() == 3 and run_dir_for_process(Path("/runs/heal")) == Path("/runs/.heal.rank-3")
