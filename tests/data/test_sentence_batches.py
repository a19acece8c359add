"""An encoder's calibration data: padded sentences, truncated by the stated rule, held-out end unseen."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kompakt.data.sentence_batches import sentence_batch
from kompakt.errors import DataError
from kompakt.model.inputs import SentenceBatch, batch_label, model_inputs, token_mask
from kompakt.model.tiny import tiny_encoder
from kompakt.recipe.rundata import RunData
from kompakt.recipe.schema import DataSpec


def test_sentences_are_tokenized_truncated_sorted_and_masked():
    loaded = tiny_encoder("bert")
    sentences = ["a b c.", "one two three four five six seven eight nine ten eleven twelve.", "x y z w."]
    batch = sentence_batch(loaded, sentences, 10, max_tokens=12)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(batch) == 3 and lengths == sorted(lengths, reverse=True) and lengths[0] == 12  # cut to max_tokens
    first = loaded.tokenizer(sentences[1], truncation=True, max_length=12)["input_ids"]
    assert batch.input_ids[0].tolist() == first  # as the encoder tokenizes in use, specials included
    assert (batch.input_ids[batch.attention_mask == 0] == loaded.tokenizer.pad_token_id).all()
    pieces = batch.split(2)
    assert [p.shape[1] for p in pieces] == [12, lengths[2]]  # each batch cut to its longest sentence
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"} and token_mask(batch).dtype == torch.bool
    assert batch_label(batch).startswith("3 sentences of up to 12 tokens")
    assert "use_cache" in model_inputs(torch.zeros(1, 4, dtype=torch.long)) and token_mask(torch.zeros(1, 4)) is None


def test_no_sentences_is_a_data_error():
    with pytest.raises(DataError, match="no sentences"):
        sentence_batch(tiny_encoder("bert"), [], 4, 16)


def test_run_calibration_of_an_encoder_leaves_the_heldout_end_out(tmp_path):
    lines = [f"sentence number {i} is here." for i in range(100)]
    path = tmp_path / "data.txt"
    path.write_text("\n".join(lines) + "\n")
    loaded = tiny_encoder("roberta")
    spec = dataclasses.replace(DataSpec(calibration_blocks=200, block_len=64), calibration=str(path))
    batch = RunData(spec, loaded, seed=0).calibration()
    assert isinstance(batch, SentenceBatch) and len(batch) == 90  # all but the held-out last 10 %
    seen = {loaded.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
            for row, mask in zip(batch.input_ids, batch.attention_mask)}  # fmt: skip
    assert seen == set(lines[:90])  # the last 10 % are what the steps are scored on
