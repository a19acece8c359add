"""Sentences to evaluate an embedding model on: the user's `--data`, or a held-out set shipped
with kompakt.

`--data` (anything kompakt.data.read_texts reads: .txt/.md, .jsonl, .parquet, a directory, a
saved HF dataset) is split by kompakt.data.sentences' rule, the one calibration and distillation
use: lines, then sentences after ".", "!" or "?" before an upper-case letter, digit or quote;
sentences under 3 words dropped; duplicates kept once (a duplicate would be its own nearest
neighbour). The first `max_sentences` are kept and the count before the cut is stated.

The default (no `--data`): `heldout_sentences.txt` beside this file, 990 short English
sentences (statements and questions) on 22 topics (cooking, weather, space, health, sport,
computing, history, animals, travel, money, arts, school, home, work, science, law, geography,
gardening, family, devices, shopping, books), about 45 each, interleaved topic by topic,
written for kompakt's evaluation (Apache-2.0 like the code). Why a shipped file rather than the
default training text (sentences SmolLM2 writes, kompakt.data.sentences): it needs no network,
no other model and no minutes of generation before the first evaluation; every machine scores on
the same sentences, so numbers compare; it is clean human-written text in topic clusters, so
nearest neighbours mean something; and no pass trains on it, so it stays held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kompakt.errors import DataError

DEFAULT_MAX_SENTENCES = 4096
DEFAULT_FILE = Path(__file__).with_name("heldout_sentences.txt")
DEFAULT_LABEL = "kompakt held-out sentences (shipped, never trained on)"
RULE = "kompakt.data.sentences: lines split after . ! ? before a capital, digit or quote; under 3 words dropped; duplicates once"


@dataclass(frozen=True)
class SentenceSet:
    """Sentences and where they came from, as a result states them."""

    sentences: list[str]
    source: str
    rule: str
    found: int  # distinct sentences before the max_sentences cut

    def describe(self) -> str:
        kept = f"{len(self.sentences):,} sentences"
        if self.found > len(self.sentences):
            kept += f" (the first of {self.found:,})"
        return f"{self.source}: {kept}"


def _cut(sentences: list[str], source: str, max_sentences: int) -> SentenceSet:
    if max_sentences < 1:
        raise DataError(f"max_sentences must be at least 1 (got {max_sentences})")
    return SentenceSet(sentences[:max_sentences], source, RULE, len(sentences))


def read_sentences(path: str | Path, max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """Sentences of a user file or directory, split by kompakt.data.sentences' rule."""
    from kompakt.data.sentences import read_sentences as read_split  # data: a sibling layer

    return _cut(read_split(path), str(path), max_sentences)


def default_sentences(max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """The shipped held-out sentences (see the module docstring for why and what they are)."""
    from kompakt.data.sentences import split_sentences

    return _cut(split_sentences([DEFAULT_FILE.read_text(encoding="utf-8")]), DEFAULT_LABEL, max_sentences)


def load_sentences(data: str | Path | None, max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """`data` read as sentences, or the shipped held-out set when `data` is None."""
    return default_sentences(max_sentences) if data is None else read_sentences(data, max_sentences)
