"""Sentence splitting and reading for sentence encoders."""

from __future__ import annotations

import pytest

from kompakt.data.sentences import read_sentences, sample_sentences, split_sentences
from kompakt.errors import DataError


def test_split_rule():
    text = ("<|im_start|>user\nWrite a story about cats.<|im_end|>\n<|im_start|>assistant\n"
            "Once upon a time, a cat lived in Paris. Dr. Smith said no! \"Really?\" she asked. Ok. "
            "It cost 3.5 euros in total.\nOnce upon a time, a cat lived in Paris.")  # fmt: skip
    assert split_sentences([text]) == [
        "Write a story about cats.", "Once upon a time, a cat lived in Paris.", "Dr. Smith said no!",
        '"Really?" she asked.', "It cost 3.5 euros in total.",
    ]  # markup gone, abbreviation and decimal kept, "Ok." too short, the duplicate kept once


def test_read_sentences_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("First sentence is here. Second one follows it.\n\nA third line of text.")
    (tmp_path / "b.jsonl").write_text('{"text": "Records work as well. Each one splits."}\n')
    assert read_sentences(tmp_path / "a.txt") == [
        "First sentence is here.", "Second one follows it.", "A third line of text."]  # fmt: skip
    assert read_sentences(tmp_path / "b.jsonl") == ["Records work as well.", "Each one splits."]
    (tmp_path / "c.txt").write_text("Hi there. Yes. Ok.")
    with pytest.raises(DataError, match="no sentence"):
        read_sentences(tmp_path / "c.txt")


def test_sample_is_deterministic_and_bounded():
    sentences = [f"sentence number {i}" for i in range(100)]
    assert sample_sentences(sentences, 10, seed=3) == sample_sentences(sentences, 10, seed=3)
    assert len(set(sample_sentences(sentences, 10))) == 10
    assert sample_sentences(sentences[:5], 10) == sentences[:5]
