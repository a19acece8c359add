"""Sentence batches: every sentence once per epoch, padded with a mask, length-bucketed,
the same batch for the same position (resume)."""

from __future__ import annotations

import torch

from kompakt.model.tiny_encoder import tiny_encoder
from kompakt.train.sentence_batches import SentenceBatches

SENTENCES = [f"{i} " + " ".join(["w"] * n) for i, n in enumerate(list(range(1, 30)) * 8)]


def _batches(seed=0):
    tokenizer = tiny_encoder("bert").tokenizer
    return SentenceBatches(SENTENCES, tokenizer, batch_size=8, max_length=64, seed=seed)


def test_an_epoch_serves_every_sentence_once_with_masks_matching_the_tokens():
    batches = _batches()
    seen = []
    for position in range(batches.per_epoch):
        ids, mask = batches.batch(position)
        assert ids.shape == mask.shape and ids.shape[0] == 8
        assert bool((ids[mask == 0] == batches.pad).all()) and bool(mask[:, 0].all())
        seen.extend(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask))
    assert len(seen) == len(set(seen)) == batches.per_epoch * 8 == len(SENTENCES)


def test_bucketing_keeps_padding_small():
    batches = _batches()
    padding = sum(float((1 - batches.batch(p)[1]).sum()) for p in range(batches.per_epoch))
    tokens = sum(len(r) for r in batches.rows)
    assert padding < 0.1 * tokens  # random batches of these lengths pad ~ 50 %


def test_positions_are_deterministic_and_epochs_differ():
    a, b = _batches(), _batches()
    assert torch.equal(a.batch(7)[0], b.batch(7)[0])
    assert not torch.equal(a.batch(0)[0], a.batch(a.per_epoch)[0])


def test_long_sentences_are_truncated_to_max_length():
    tokenizer = tiny_encoder("bert").tokenizer
    batches = SentenceBatches(["x " * 500] * 4, tokenizer, batch_size=4, max_length=16, seed=0)
    assert batches.batch(0)[0].shape == (4, 16)
