"""What one calibration batch is: token blocks for a causal LM, padded sentences for an encoder.

A decoder is calibrated on full blocks of running text ([n, len] token ids, no padding: every
position is a real token). An encoder reads one sentence at a time, so its calibration data is
tokenised sentences padded to a common length with an attention mask ([n, len] ids + [n, len]
mask), as it sees them in use. `SentenceBatch` is that second form; it slices, splits and moves
like the id tensor it stands beside, so the code that batches calibration data (`blocks[:n]`,
`blocks.split(8)`, `batch.to(device)`, `blocks.shape`) handles both unchanged, and the three
functions below are the only places that tell them apart:

- `model_inputs(batch)`: the keyword arguments of the model's forward;
- `token_mask(batch)`: which positions are real tokens (None: all of them), so statistics
  (Hessians, importances, cosines) never count padding;
- `batch_label(batch)`: what a step calibrated on, in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SentenceBatch:
    """Tokenised sentences padded to one length: input_ids and attention_mask, both [n, len]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                             f"{tuple(self.attention_mask.shape)} must be equal [n, len] shapes")  # fmt: skip

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: Any) -> SentenceBatch:
        """Rows, as a tensor's first dimension slices (`batch[:8]`, `batch[[0, 3]]`)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return SentenceBatch(self.input_ids[index], self.attention_mask[index])

    def split(self, size: int) -> tuple[SentenceBatch, ...]:
        """Batches of `size` rows, each cut to its longest sentence (no all-padding columns):
        sentences sorted by length then cost what their own tokens cost."""
        return tuple(self[start : start + size].trimmed() for start in range(0, len(self), size))

    def trimmed(self) -> SentenceBatch:
        """Without the trailing columns that are padding in every row (right padding)."""
        length = int(self.attention_mask.sum(1).max()) if len(self) else 0
        return SentenceBatch(self.input_ids[:, :length], self.attention_mask[:, :length])

    def to(self, device: torch.device | str) -> SentenceBatch:
        return SentenceBatch(self.input_ids.to(device), self.attention_mask.to(device))

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.attention_mask.sum())


Batch = torch.Tensor | SentenceBatch


def model_inputs(batch: Batch) -> dict[str, Any]:
    """Forward keyword arguments: ids (and no KV cache) for a block, ids and mask for sentences."""
    if isinstance(batch, SentenceBatch):
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return {"input_ids": batch, "use_cache": False}


def token_mask(batch: Batch) -> torch.Tensor | None:
    """[n, len] bool, True at real tokens; None when every position is one (token blocks)."""
    return batch.attention_mask.bool() if isinstance(batch, SentenceBatch) else None


def batch_label(batch: Batch) -> str:
    """'128 blocks of 512 tokens' / '256 sentences of up to 128 tokens (9876 tokens)'."""
    n, length = batch.shape[0], batch.shape[1]
    if isinstance(batch, SentenceBatch):
        return f"{n} sentences of up to {length} tokens ({batch.tokens} tokens)"
    return f"{n} blocks of {length} tokens"


def pad_sentences(ids: list[list[int]], pad_id: int) -> SentenceBatch:
    """Right-pad token id lists into a SentenceBatch (the mask marks the real tokens)."""
    if not ids or not all(ids):
        raise ValueError("pad_sentences needs at least one sentence and no empty one")
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return SentenceBatch(input_ids, mask)
