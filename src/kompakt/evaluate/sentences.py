"""Sentences to evaluate an embedding model on: the user's `--data`, or a held-out set shipped
with kompakt.

The default (no `--data`): `heldout_sentences.txt` beside this file, 990 short English
sentences (statements and questions) on 22 topics (cooking, weather, space, health, sport,
computing, history, animals, travel, money, arts, school, home, work, science, law, geography,
gardening, family, devices, shopping, books), about 45 each, interleaved topic by topic,
written for kompakt's evaluation (Apache-2.0 like the code). Why a shipped file and not generated or
downloaded text: it needs no network and no other model, it costs nothing to read, every
machine evaluates on the same sentences, and no kompakt pass ever trains or calibrates on it
(training text is the user's data or text the embedded decoder generates), so it stays
held out. Sentences cluster by topic, so nearest neighbours mean something.

Reading `--data` (any format kompakt.data.read_texts reads: .txt/.md, .jsonl, .parquet, a
directory, a saved HF dataset), the rule, stated in every result:
- each document is cut into lines, and each line into sentences after ".", "!" or "?" (and any
  closing quotes or brackets) when whitespace and an upper-case letter, a digit or an opening
  quote follow; a period after a single letter or a common abbreviation (e.g., Dr., etc.) does
  not end a sentence. A file of one sentence per line is therefore read as it is.
- whitespace runs become one space; pieces without a letter or digit are dropped;
- exact duplicates are dropped (a duplicate would be its own nearest neighbour);
- the first `max_sentences` are kept (the count before the cut is stated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kompakt.errors import DataError

DEFAULT_MAX_SENTENCES = 4096
DEFAULT_FILE = Path(__file__).with_name("heldout_sentences.txt")
DEFAULT_LABEL = "kompakt held-out sentences (shipped, never trained on)"
RULE = (
    "lines split into sentences after . ! ? before an upper-case letter, digit or quote; "
    "duplicates dropped"
)
_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs mr mrs ms dr prof st jr sr no fig approx cf al inc ltd co dept est".split()
)
_WORD_BEFORE = re.compile(r"([\w.]+)$")


@dataclass(frozen=True)
class SentenceSet:
    """Sentences and where they came from, as a result states them."""

    sentences: list[str]
    source: str
    rule: str
    found: int  # distinct sentences before the max_sentences cut
    duplicates: int = 0

    def describe(self) -> str:
        kept = f"{len(self.sentences):,} sentences"
        if self.found > len(self.sentences):
            kept += f" (the first of {self.found:,})"
        return f"{self.source}: {kept}"


def _ends_sentence(line: str, period: int) -> bool:
    """Whether the '.' at `period` ends a sentence (not an initial or a known abbreviation)."""
    if line[period] != ".":
        return True
    word = _WORD_BEFORE.search(line[:period])
    if word is None:
        return True
    token = word.group(1).lower().rstrip(".")
    return not (len(token) == 1 and token.isalpha()) and token not in _ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` by the module's rule (lines, then sentence ends)."""
    out: list[str] = []
    for line in text.splitlines():
        line = " ".join(line.split())
        start = 0
        for match in _END.finditer(line):
            if _ends_sentence(line, match.start()):
                out.append(line[start : match.end()].strip())
                start = match.end()
        out.append(line[start:].strip())
    return [piece for piece in out if any(ch.isalnum() for ch in piece)]


def sentence_set(texts: list[str], source: str, max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """Split `texts` into sentences, drop duplicates, keep the first `max_sentences`."""
    if max_sentences < 1:
        raise DataError(f"max_sentences must be at least 1 (got {max_sentences})")
    seen: dict[str, None] = {}
    total = 0
    for text in texts:
        for sentence in split_sentences(text):
            total += 1
            seen.setdefault(sentence)
    if not seen:
        raise DataError(f"{source} holds no sentences; pass a text file with one sentence (or paragraph) per line")
    distinct = list(seen)
    return SentenceSet(distinct[:max_sentences], source, RULE, len(distinct), total - len(distinct))


def read_sentences(path: str | Path, max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """Sentences of a user file or directory (any format kompakt.data.read_texts reads)."""
    from kompakt.data.sources import read_texts  # data is a sibling layer: imported where used

    return sentence_set(read_texts(path), str(path), max_sentences)


def default_sentences(max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """The shipped held-out sentences (see the module docstring for why and what they are)."""
    text = DEFAULT_FILE.read_text(encoding="utf-8")
    return sentence_set([text], DEFAULT_LABEL, max_sentences)


def load_sentences(data: str | Path | None, max_sentences: int = DEFAULT_MAX_SENTENCES) -> SentenceSet:
    """`data` read as sentences, or the shipped held-out set when `data` is None."""
    return default_sentences(max_sentences) if data is None else read_sentences(data, max_sentences)
