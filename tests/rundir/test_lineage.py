"""lineage.jsonl: complete lines only; a torn tail (kill mid-write) is dropped and cut off."""

from __future__ import annotations

import pytest

from kompakt.errors import OutputPathError
from kompakt.rundir.hashing import digest, file_identity, step_hash
from kompakt.atomic import write_text as atomic_write_text
from kompakt.rundir.lineage import append_record, read_lineage


def test_append_and_read(tmp_path):
    append_record(tmp_path, {"index": 1})
    append_record(tmp_path, {"index": 2})
    assert read_lineage(tmp_path) == [{"index": 1}, {"index": 2}]


def test_torn_tail_is_ignored_then_cut(tmp_path):
    append_record(tmp_path, {"index": 1})
    with (tmp_path / "lineage.jsonl").open("a") as handle:
        handle.write('{"index": 2, "pa')
    assert read_lineage(tmp_path) == [{"index": 1}]
    append_record(tmp_path, {"index": 2})
    assert read_lineage(tmp_path) == [{"index": 1}, {"index": 2}]
    assert (tmp_path / "lineage.jsonl").read_text().count("\n") == 2


def test_corrupt_line_is_a_one_line_error(tmp_path):
    (tmp_path / "lineage.jsonl").write_text('{"index": 1}\nnot json\n')
    with pytest.raises(OutputPathError, match="line 2 is not valid JSON"):
        read_lineage(tmp_path)


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_text(tmp_path / "a.yaml", "x: 1\n")
    atomic_write_text(tmp_path / "a.yaml", "x: 2\n")
    assert (tmp_path / "a.yaml").read_text() == "x: 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.yaml"]


def test_hashes_are_stable_and_sensitive(tmp_path):
    assert digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
    base = step_hash("fp", "prune.depth", {"count": 1}, "data", 0)
    assert base == step_hash("fp", "prune.depth", {"count": 1}, "data", 0)
    assert len({base, step_hash("fp2", "prune.depth", {"count": 1}, "data", 0),
                step_hash("fp", "prune.depth", {"count": 2}, "data", 0),
                step_hash("fp", "prune.depth", {"count": 1}, "data2", 0),
                step_hash("fp", "prune.depth", {"count": 1}, "data", 1)}) == 5  # fmt: skip
    (tmp_path / "t.txt").write_text("abc")
    first = file_identity(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("abd")
    assert file_identity(tmp_path / "t.txt") != first and file_identity(None) is None
