"""Training batches of sentences for encoders: padded to the longest sentence of the batch,
with an attention mask, in a seeded order that a checkpoint resumes from exactly.

Unlike the decoder's packed sequences (kompakt.train.data), sentences are never joined: a
sentence embedding is pooled over one sentence, so each row is one sentence, truncated to
`max_length` tokens (the encoder's limit: min(max_seq_length, position limit)) and padded.

Length bucketing: each epoch shuffles the sentences, cuts the order into pools of
BUCKET_BATCHES batches, sorts each pool by length and serves its batches in a shuffled order,
so a batch holds sentences of similar length and little padding (WikiText sentences range from
5 to 200 tokens: random batches spent most of their compute on padding).

The loop reads a batch as `(ids, labels)`; for sentence batches the second tensor is the
attention mask [B, T] (1 = token, 0 = padding), which is what encoder objectives take there.
"""

from __future__ import annotations

import torch

from kompakt.errors import DataError

BUCKET_BATCHES = 32


class SentenceBatches:
    """`batch(position)` -> (input_ids [B, T], attention_mask [B, T]), T = longest in the batch.

    Batch number b is a pure function of (sentences, batch_size, seed, b).
    """

    def __init__(self, sentences: list[str], tokenizer, *, batch_size: int, max_length: int, seed: int,
                 source: str = "") -> None:  # fmt: skip
        if len(sentences) < batch_size:
            raise DataError(
                f"training sentences ({source or 'given'}) number {len(sentences)}, fewer than one batch of "
                f"{batch_size}; give more text or lower batch_size"
            )
        encoded = tokenizer(list(sentences), truncation=True, max_length=max_length, padding=False)["input_ids"]
        self.rows = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        pad = tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else 0)
        self.batch_size = batch_size
        self.seed = seed
        self.source = source
        self.per_epoch = len(self.rows) // batch_size  # a last partial batch is dropped
        self._order: tuple[int, list[torch.Tensor]] | None = None

    @property
    def sentences(self) -> int:
        return len(self.rows)

    def mean_tokens(self) -> float:
        """Mean tokens per sentence (special tokens included): what a token budget divides by."""
        return sum(len(r) for r in self.rows) / max(1, len(self.rows))

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The epoch's batches (sentence indices), length-bucketed as the module docstring says."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.rows), generator=generator)[: self.per_epoch * self.batch_size]
            lengths = torch.tensor([len(self.rows[int(i)]) for i in order])
            pool = self.batch_size * BUCKET_BATCHES
            batches: list[torch.Tensor] = []
            for start in range(0, order.numel(), pool):
                chunk = order[start : start + pool]
                chunk = chunk[torch.argsort(lengths[start : start + pool], descending=True, stable=True)]
                batches.extend(chunk.split(self.batch_size))
            shuffle = torch.randperm(len(batches), generator=generator)
            self._order = (epoch, [batches[int(i)] for i in shuffle])
        return self._order[1]

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of batch number `position` (0-based, across epochs)."""
        epoch, index = divmod(position, self.per_epoch)
        picked = self._epoch_batches(epoch)[index]
        return pad_rows([self.rows[int(i)] for i in picked], self.pad)


def pad_rows(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to the longest: (ids [B, T], attention_mask [B, T])."""
    length = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
    return ids, mask
