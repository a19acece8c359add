"""Sentence splitting (the stated rule) and reading sentences from files."""

from __future__ import annotations

import pytest

from kompakt.data.sentences import _answers, read_sentences, split_sentences
from kompakt.errors import DataError


def test_split_sentences_follows_the_stated_rule():
    text = ('The river rose quickly. "It will flood," she said! Did it? Yes.\n'
            "Prices fell by 3.5 percent in 2020. 42 people came to the meeting.\n\n"
            "Heading\n- a list item with words")  # fmt: skip
    assert split_sentences(text) == [
        "The river rose quickly.",
        '"It will flood," she said!',
        "Prices fell by 3.5 percent in 2020.",
        "42 people came to the meeting.",
        "- a list item with words",
    ]  # "Did it?" / "Yes." / "Heading": fewer than three words


def test_chat_markup_and_prompts_are_removed():
    document = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "Write about bees.<|im_end|>\n<|im_start|>assistant\nBees live in large colonies. "
                "They make honey from nectar.")  # fmt: skip
    assert split_sentences(_answers(document)) == ["Bees live in large colonies.", "They make honey from nectar."]


def test_read_sentences_gives_back_lines_and_drops_duplicates(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("A man is playing a guitar.\nA man is playing a guitar.\nTwo dogs run on the beach\n")
    assert read_sentences(path) == ["A man is playing a guitar.", "Two dogs run on the beach"]


def test_a_file_without_sentences_is_a_data_error(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("one\ntwo words\n")
    with pytest.raises(DataError, match="no sentence of at least 3 words"):
        read_sentences(path)
