"""Sentence sources for encoder evaluation: the split rule, user files, the shipped default."""

from __future__ import annotations

import json

import pytest

from kompakt.errors import DataError
from kompakt.evaluate.sentences import default_sentences, load_sentences, read_sentences, split_sentences


def test_one_sentence_per_line_is_read_as_it_is():
    text = "The cat sleeps.\nIs it raining?\n\n  Two   spaces  here  \n"
    assert split_sentences(text) == ["The cat sleeps.", "Is it raining?", "Two spaces here"]


def test_paragraphs_split_at_sentence_ends_but_not_at_abbreviations_or_initials():
    text = 'Dr. Smith arrived, e.g. at noon. J. R. R. Tolkien wrote it! "Really?" she asked. It cost 3.5 euros. 2024 was warm.'
    assert split_sentences(text) == [
        "Dr. Smith arrived, e.g. at noon.",
        "J. R. R. Tolkien wrote it!",
        '"Really?" she asked.',
        "It cost 3.5 euros.",
        "2024 was warm.",
    ]


def test_pieces_without_letters_or_digits_are_dropped():
    assert split_sentences("---\n= = =\nReal text.") == ["Real text."]


def test_a_user_file_is_deduplicated_capped_and_described(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("A first one. A second one.\nA first one.\nA third one.\nA fourth one.\n")
    got = read_sentences(path, max_sentences=3)
    assert got.sentences == ["A first one.", "A second one.", "A third one."]
    assert (got.found, got.duplicates) == (4, 1)
    assert "the first of 4" in got.describe() and str(path) in got.describe()


def test_jsonl_records_are_split_too(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One. Two.", "Three.")))
    assert read_sentences(path).sentences == ["One.", "Two.", "Three."]


def test_an_empty_or_letterless_file_is_a_one_line_data_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError) as info:
        read_sentences(empty)
    assert "\n" not in str(info.value)
    dashes = tmp_path / "dashes.txt"
    dashes.write_text("----\n....\n")
    with pytest.raises(DataError, match="no sentences"):
        read_sentences(dashes)


def test_the_shipped_default_needs_nothing_and_is_distinct():
    got = load_sentences(None)
    assert got.sentences == default_sentences().sentences
    assert len(got.sentences) == got.found >= 900 and got.duplicates == 0
    assert all(len(s.split()) >= 3 for s in got.sentences)
    assert "never trained on" in got.source
