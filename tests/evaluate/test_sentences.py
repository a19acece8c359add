"""Sentence sources for encoder evaluation: user files (kompakt.data.sentences' rule, tested
there), the cap and how it is stated, and the shipped held-out default."""

from __future__ import annotations

import json

import pytest

from kompakt.data.sentences import split_sentences
from kompakt.errors import DataError
from kompakt.evaluate.sentences import DEFAULT_FILE, default_sentences, load_sentences, read_sentences


def test_a_user_file_is_split_deduplicated_capped_and_described(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("A first one here. A second one here.\nA first one here.\nA third one here.\nA fourth one here.\n")
    got = read_sentences(path, max_sentences=3)
    assert got.sentences == ["A first one here.", "A second one here.", "A third one here."]
    assert got.found == 4
    assert "the first of 4" in got.describe() and str(path) in got.describe()
    assert "kompakt.data.sentences" in got.rule


def test_jsonl_records_are_split_too(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One is here. Two is here.", "Three is here.")))
    assert read_sentences(path).sentences == ["One is here.", "Two is here.", "Three is here."]


def test_an_empty_or_sentence_less_file_is_a_one_line_data_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError) as info:
        read_sentences(empty)
    assert "\n" not in str(info.value)
    short = tmp_path / "short.txt"
    short.write_text("----\nOk.\nYes no.\n")
    with pytest.raises(DataError, match="no sentence"):
        read_sentences(short)
    with pytest.raises(DataError, match="at least 1"):
        load_sentences(None, max_sentences=0)


def test_the_shipped_default_needs_nothing_and_every_line_is_one_sentence():
    got = load_sentences(None)
    lines = [line for line in DEFAULT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert got.sentences == default_sentences().sentences == lines  # the rule keeps each line whole
    assert len(lines) == len(set(lines)) == got.found == 990
    assert split_sentences(lines) == lines
    assert "never trained on" in got.source
