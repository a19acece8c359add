"""Sentences for sentence encoders: read from the user's data, or generated when none is given.

Splitting rule (stated once, used by calibration, distillation and evaluation): a document is
split into lines, and a line into sentences after ".", "!" or "?" (closing quotes and brackets
kept) followed by whitespace and an upper-case letter, digit or opening quote. Sentences of
fewer than 3 words are dropped; duplicates are kept once, in first-seen order. Nothing is cut
here: an encoder truncates a sentence longer than its input limit (kompakt.model.encode).

Default calibration and training text (no `--data`, no network): sentences from text the
embedded decoder SmolLM2-135M writes for a few hundred varied requests (stories, explanations,
articles, emails, dialogues on many topics; kompakt.data.generated), generated once and cached.
Chat markup is stripped. Held-out evaluation never uses it: it reads the sentences kompakt ships
(kompakt.evaluate.sentences), which no pass trains or calibrates on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from kompakt.errors import DataError

MIN_WORDS = 3
DEFAULT_SOURCE = "smollm2-135m"  # the embedded decoder that writes the default sentences
GENERATION_SEED = 0
_TOKENS_PER_SENTENCE = 24  # generated tokens per kept sentence, measured on SmolLM2's output (rounded up)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])")
_CHAT_MARKUP = re.compile(r"<\|[^|>]*\|>(?:\s*(?:system|user|assistant)\b)?|</?s>")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e|No|Fig)\.$")


def _sentences_of(line: str) -> list[str]:
    """Split one line at sentence boundaries, re-joining a split made after an abbreviation."""
    parts: list[str] = []
    for piece in _BOUNDARY.split(line):
        if parts and _ABBREVIATION.search(parts[-1]):
            parts[-1] = f"{parts[-1]} {piece}"
        else:
            parts.append(piece)
    return parts


def split_sentences(texts: list[str]) -> list[str]:
    """Sentences of `texts` by the rule in the module docstring."""
    seen: dict[str, None] = {}
    for text in texts:
        for line in _CHAT_MARKUP.sub("\n", text).splitlines():
            for sentence in _sentences_of(line.strip()):
                sentence = " ".join(sentence.split())
                if len(sentence.split()) >= MIN_WORDS:
                    seen.setdefault(sentence, None)
    return list(seen)


def read_sentences(path: str | Path, tokenizer: Any = None) -> list[str]:
    """The sentences of a user's data (anything kompakt.data.read_texts reads), split by the rule."""
    from kompakt.data.sources import read_texts

    sentences = split_sentences(read_texts(path, tokenizer=tokenizer))
    if not sentences:
        raise DataError(f"{path} holds no sentence of {MIN_WORDS} words or more; pass a file with sentences in it")
    return sentences


def default_sentences(n: int) -> list[str]:
    """`n` sentences of the default calibration / training text (generated once, cached)."""
    from kompakt.data.generated import generate_texts
    from kompakt.model.load import load

    writer = load(DEFAULT_SOURCE, device="cpu")
    wanted = n * _TOKENS_PER_SENTENCE
    while True:
        sentences = split_sentences(generate_texts(writer, wanted, seed=GENERATION_SEED))
        if len(sentences) >= n:
            return sentences[:n]
        wanted *= 2  # fewer sentences per token than assumed: generate more (a cached prefix is reused)


def sample_sentences(sentences: list[str], n: int, seed: int = 0) -> list[str]:
    """At most `n` sentences drawn without replacement, deterministic for a seed."""
    if len(sentences) <= n:
        return list(sentences)
    return random.Random(seed).sample(sentences, n)
