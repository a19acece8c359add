"""Calibration data for a sentence encoder: tokenised sentences padded with an attention mask.

A causal LM is calibrated on fixed-length blocks cut from running text (kompakt.data.blocks);
an encoder reads single sentences, so its calibration set is `n` sentences (kompakt.data.sentences:
the user's data split by the stated rule, or the default generated sentences), each tokenised as
the encoder tokenises it in use (special tokens added) and truncated to the smaller of the
encoder's input limit (kompakt.model.encode) and `max_tokens`. They are sorted longest first, so
consecutive rows have similar lengths and a batch's padding (which every statistic leaves out, see
kompakt.model.inputs) stays small.

Which sentences: the recipe runner (kompakt.recipe.rundata) passes the run data's sentences
without the held-out end its steps are scored on, so calibration never sees them.
"""

from __future__ import annotations

from typing import Any

from kompakt.errors import ConfigError, DataError
from kompakt.model.inputs import SentenceBatch, pad_sentences


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
    ids = loaded.tokenizer(loaded.pooling.texts(chosen), truncation=True, max_length=limit)["input_ids"]
    ids = sorted((row for row in ids if row), key=len, reverse=True)
    pad_id = loaded.tokenizer.pad_token_id
    return pad_sentences(ids, 0 if pad_id is None else pad_id)
