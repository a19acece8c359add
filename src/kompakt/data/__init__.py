"""Calibration and training data: user files, self-generated text, token blocks."""

from __future__ import annotations

from kompakt.data.blocks import consecutive_blocks, sample_blocks, split_heldout, tokenize_texts
from kompakt.data.generated import generate_texts
from kompakt.data.loader import DEFAULT_GENERATED_TOKENS, load_tokens
from kompakt.data.sources import read_texts

__all__ = [
    "DEFAULT_GENERATED_TOKENS",
    "consecutive_blocks",
    "generate_texts",
    "load_tokens",
    "read_texts",
    "sample_blocks",
    "split_heldout",
    "tokenize_texts",
]
