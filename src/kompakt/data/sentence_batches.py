"""Calibration data for a sentence encoder: tokenised sentences padded with an attention mask.

A causal LM is calibrated on fixed-length blocks cut from running text (kompakt.data.blocks);
an encoder reads single sentences, so its calibration set is `n` sentences (kompakt.data.sentences:
the user's data split by the stated rule, or the default generated sentences), each tokenised as
the encoder tokenises it in use (special tokens added) and truncated to the smaller of the
encoder's input limit (kompakt.model.encode) and `max_tokens`. They are sorted longest first, so
consecutive rows have similar lengths and a batch's padding (which every statistic leaves out, see
kompakt.model.inputs) stays small.

Held out: when the run evaluates on the same source, the last 10 % of its sentences (the end, as
kompakt.data.blocks.split_heldout holds out the end of a token stream) are never calibrated on.
"""

from __future__ import annotations

from typing import Any

from kompakt.errors import ConfigError, DataError
from kompakt.model.inputs import SentenceBatch, pad_sentences


def heldout_sentences(sentences: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(calibration / training sentences, held-out sentences): the held-out part is the end."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"held-out fraction must be between 0 and 1 (exclusive), got {fraction}")
    n_heldout = max(1, round(len(sentences) * fraction))
    if len(sentences) - n_heldout < 1:
        raise DataError(f"too little data to hold any out: {len(sentences)} sentences; pass more text")
    return sentences[:-n_heldout], sentences[-n_heldout:]


def sentence_batch(loaded: Any, sentences: list[str], n: int, max_tokens: int, seed: int = 0) -> SentenceBatch:
    """`n` of `sentences` (drawn without replacement for `seed`, all when fewer) as one padded
    SentenceBatch [n, longest], longest first; see the module docstring."""
    from kompakt.data.sentences import sample_sentences
    from kompakt.model.encode import input_limit

    if not sentences:
        raise DataError("no sentences to calibrate on; pass --data with sentences in it")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    chosen = sample_sentences(sentences, n, seed)
    limit = min(input_limit(loaded), max_tokens)
    ids = loaded.tokenizer(chosen, truncation=True, max_length=limit)["input_ids"]
    ids = sorted((row for row in ids if row), key=len, reverse=True)
    pad_id = loaded.tokenizer.pad_token_id
    return pad_sentences(ids, 0 if pad_id is None else pad_id)
