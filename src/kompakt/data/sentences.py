"""Sentences for embedding models: read from the user's text, or split from text the embedded
language model writes when no data is given.

Splitting rule (stated, so results can be reproduced): a document is cut into paragraphs at
line breaks; a paragraph is cut into sentences after `.`, `!` or `?` (optionally followed by a
closing quote or bracket) when whitespace and then an upper-case letter, a digit or an opening
quote follow. Chat markup (`<|...|>` tokens, role lines) is removed first. Sentences with fewer
than `MIN_WORDS` words (headings, list numbers, fragments) are dropped, and exact duplicates
are kept once, first occurrence first. A file of one sentence per line therefore gives back
its lines (the short ones aside).

No data given (`training_sentences(None, ...)`): sentences split from the answers the embedded
SmolLM2-135M-Instruct writes to varied requests (`kompakt.data.generate_texts`, temperature 1,
cached on disk), the same self-generated text the decoder passes calibrate on — it needs no
network. Only the assistant's answers are used, not the prompt templates. Training sentences
are sampled with seed + TRAINING_SEED_OFFSET, so they are not the ones an evaluation sampled
with seed or seed + 1 holds out.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kompakt.errors import DataError

logger = logging.getLogger(__name__)

MIN_WORDS = 3
# Generated answers average ≈ 25 SmolLM2 tokens per kept sentence (measured on its cached text).
TOKENS_PER_SENTENCE = 30
# Generation seed offset of training sentences, as for decoder training text
# (kompakt.train.sources): seed is calibration, seed + 1 held-out evaluation, seed + 2 training.
TRAINING_SEED_OFFSET = 2
_MARKUP = re.compile(r"<\|[^|>]*\|>")
_ROLE_LINE = re.compile(r"^(system|user|assistant)\s*$", re.IGNORECASE)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """The sentences of one document, by the rule in the module docstring (duplicates kept)."""
    text = _MARKUP.sub("\n", text)
    sentences = []
    for paragraph in text.splitlines():
        paragraph = paragraph.strip()
        if not paragraph or _ROLE_LINE.match(paragraph):
            continue
        for sentence in _BOUNDARY.split(paragraph):
            sentence = " ".join(sentence.split())
            if len(sentence.split()) >= MIN_WORDS:
                sentences.append(sentence)
    return sentences


def unique(sentences: list[str]) -> list[str]:
    """Exact duplicates removed, first occurrence kept, order kept."""
    return list(dict.fromkeys(sentences))


def read_sentences(source: str | Path) -> list[str]:
    """The sentences of a text / jsonl / parquet file, directory or saved dataset (see read_texts)."""
    from kompakt.data.sources import read_texts

    sentences = unique([s for text in read_texts(source) for s in split_sentences(text)])
    if not sentences:
        raise DataError(
            f"{source} holds no sentence of at least {MIN_WORDS} words; give text with one sentence per line or prose"
        )
    return sentences


def _answers(text: str) -> str:
    """The assistant's part of a generated chat document (all of it for base-model text)."""
    marker = "<|im_start|>assistant"
    return text.rsplit(marker, 1)[1] if marker in text else text


def generated_sentences(generator: Any, n_sentences: int, seed: int = 0) -> list[str]:
    """At least `n_sentences` sentences (fewer only if the model writes too few) split from
    text `generator` (a decoder LoadedModel) writes; cached with the generated text."""
    from kompakt.data.generated import generate_texts

    texts = generate_texts(generator, n_sentences * TOKENS_PER_SENTENCE, seed)
    sentences = unique([s for text in texts for s in split_sentences(_answers(text))])
    if not sentences:
        raise DataError(f"{generator.name} wrote no usable sentences; pass --data with sentences")
    return sentences[:n_sentences] if len(sentences) > n_sentences else sentences


def training_sentences(source: str | Path | None, n_sentences: int, *, seed: int = 0,
                       generator: Any = None) -> tuple[list[str], str]:  # fmt: skip
    """(sentences, where they come from): the user's `source`, else generated (see module doc).

    Args:
        source: a data path, or None for generated sentences.
        n_sentences: how many are wanted (a file gives all of its sentences).
        generator: the decoder that writes text when `source` is None (default: the embedded
            SmolLM2-135M-Instruct, loaded here).
    """
    if source is not None:
        return read_sentences(source), str(source)
    if generator is None:
        from kompakt.model.load import load

        generator = load(None)
    logger.info("no sentences given: splitting %d from text %s writes (cached)", n_sentences, generator.name)
    return generated_sentences(generator, n_sentences, seed + TRAINING_SEED_OFFSET), f"sentences from text generated by {generator.name}"
