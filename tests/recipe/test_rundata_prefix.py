"""Calibration blocks start with what the tokenizer puts before text (Gemma's <bos>)."""

from __future__ import annotations

import dataclasses

from tokenizers import processors

from kompakt.model.tiny import tiny_model
from kompakt.recipe.rundata import RunData
from kompakt.recipe.schema import DataSpec

SPEC = DataSpec(calibration_blocks=4, block_len=32, eval_tokens=256, window=32, stride=32)


def _with_bos(loaded):
    """The tiny model with a tokenizer that puts <s> before text, as Gemma's does."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return loaded


def test_blocks_start_with_the_tokenizer_prefix(text_file):
    loaded = _with_bos(tiny_model("gemma3_text"))
    blocks = RunData(dataclasses.replace(SPEC, calibration=str(text_file)), loaded, 0).calibration()
    assert blocks.shape == (4, 32)
    assert (blocks[:, 0] == loaded.tokenizer.bos_token_id).all()
    assert (blocks[:, 1:] != loaded.tokenizer.bos_token_id).all()  # the text itself holds no <bos>


def test_prefix_free_tokenizers_keep_their_blocks_and_hash(text_file):
    spec = dataclasses.replace(SPEC, calibration=str(text_file))
    plain = RunData(spec, tiny_model("llama"), 0)
    prefixed = RunData(spec, _with_bos(tiny_model("llama")), 0)
    assert plain.calibration().shape == (4, 32)
    assert plain.identity() != prefixed.identity()  # the blocks differ, so cached steps must too
