"""Training tokens: one packed stream with a target mask, cut into sequences, served in a
seeded order that a checkpoint can resume from exactly.

Packing: documents are joined into one token stream (as `kompakt.data.tokenize_texts` does)
and cut into consecutive sequences of `seq_len` tokens, so no position is padding and every
forward pass does useful work (Raffel et al. 2020 "T5"; Krell et al. 2021 on packing). A
sequence may span two documents; the separator between them says where one ends.

Chat / instruction jsonl (records with `messages`): each conversation is rendered with the
model's chat template and only the assistant turns are targets (`answer_only`), the usual
supervised fine-tuning loss (the prompt is context, not something to imitate).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kompakt.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TrainData:
    """A token stream `ids` [N] and `targets` [N] (bool: position is a training target)."""

    ids: torch.Tensor
    targets: torch.Tensor
    source: str = ""

    @classmethod
    def plain(cls, ids: torch.Tensor, source: str = "") -> TrainData:
        return cls(ids.long(), torch.ones_like(ids, dtype=torch.bool), source)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def split_heldout(self, fraction: float) -> tuple[TrainData, TrainData]:
        """(train, held-out) with the held-out part the contiguous end (unseen by training)."""
        n_heldout = max(1, round(self.n_tokens * fraction))
        if self.n_tokens - n_heldout < 1:
            raise DataError(f"too little training data to hold any out ({self.n_tokens} tokens); pass more text")
        cut = self.n_tokens - n_heldout
        return (TrainData(self.ids[:cut], self.targets[:cut], self.source),
                TrainData(self.ids[cut:], self.targets[cut:], self.source))  # fmt: skip


class SequenceBatches:
    """Packed sequences [batch_size, seq_len] of ids and labels, in a seeded order per epoch.

    Batch number b is a pure function of (data, seq_len, batch_size, seed, b), so resuming at
    position b gives exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, data: TrainData, *, seq_len: int, batch_size: int, seed: int) -> None:
        n_seq = data.n_tokens // seq_len
        if n_seq < batch_size:
            raise DataError(
                f"training data ({data.source or 'given'}) has {data.n_tokens} tokens, fewer than one batch "
                f"of {batch_size} x {seq_len}; give more text or lower batch_size / seq_len"
            )
        self.ids = data.ids[: n_seq * seq_len].reshape(n_seq, seq_len)
        labels = data.ids.clone()
        labels[~data.targets] = IGNORE_INDEX
        self.labels = labels[: n_seq * seq_len].reshape(n_seq, seq_len)
        if not bool((self.labels[:, 1:] != IGNORE_INDEX).any()):
            raise DataError(f"training data ({data.source or 'given'}) has no target tokens (no answers to learn)")
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = n_seq // batch_size  # a last partial batch is dropped (fixed shapes)
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def sequences(self) -> int:
        return self.ids.shape[0]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.sequences, generator=generator))
        return self._order[1]

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels) of batch number `position` (0-based, across epochs)."""
        epoch, index = divmod(position, self.per_epoch)
        rows = self._epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.ids[rows], self.labels[rows]


# --- reading ---------------------------------------------------------------------------------


def is_chat_file(path: str | Path) -> bool:
    """A .jsonl / .json whose first record has `messages` (and no `text`)."""
    path = Path(path).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "messages" in record and "text" not in record
    return False


def chat_data(path: str | Path, tokenizer: Any, *, answer_only: bool = True) -> TrainData:
    """Conversations from chat jsonl, packed, with assistant tokens as the only targets."""
    from kompakt.data.sources import render_chat

    path = Path(path).expanduser()
    ids: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    separator = _encode("\n\n", tokenizer)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{where}: chat record without 'messages'; give every line a 'messages' list")
        messages = record["messages"]
        render_chat(messages, tokenizer, where)  # validates roles / contents with a clear message
        conv_ids, conv_targets = _conversation(messages, tokenizer, answer_only, where)
        if ids:
            ids.append(separator)
            targets.append(torch.zeros_like(separator, dtype=torch.bool))
        ids.append(conv_ids)
        targets.append(conv_targets)
    if not ids:
        raise DataError(f"{path} holds no conversations; pass a file with one JSON object per line")
    return TrainData(torch.cat(ids), torch.cat(targets), str(path))


def _encode(text: str, tokenizer: Any) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _render(messages: list[dict], tokenizer: Any, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return "\n\n".join(m["content"] for m in messages) + ("\n\n" if generation_prompt and messages else "")


def _conversation(messages: list[dict], tokenizer: Any, answer_only: bool, where: str):
    """Token ids of a rendered conversation and which of them are assistant answer tokens.

    Each assistant turn's tokens are those between the rendering of the conversation before
    it (with the generation prompt) and the rendering including it; checked to be a prefix.
    """
    full = _encode(_render(messages, tokenizer, False), tokenizer)
    if not answer_only:
        return full, torch.ones_like(full, dtype=torch.bool)
    mask = torch.zeros_like(full, dtype=torch.bool)
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = _encode(_render(messages[:index], tokenizer, True), tokenizer).numel() if index else 0
        end = _encode(_render(messages[: index + 1], tokenizer, False), tokenizer).numel()
        mask[start:end] = True
    if not bool(mask.any()):
        raise DataError(f"{where}: no assistant message to learn from; give each conversation an assistant answer")
    return full, mask


def load_training(source: str | Path, tokenizer: Any, *, n_tokens: int | None = None,
                  answer_only: bool = True) -> TrainData:  # fmt: skip
    """User training data: chat jsonl (answer tokens as targets, all of it) or any text source
    (its first `n_tokens` tokens; all when None)."""
    from kompakt.data import read_texts, tokenize_texts

    if is_chat_file(source):
        # Whole conversations (a cut would drop answers); n_tokens only bounds plain text.
        return chat_data(source, tokenizer, answer_only=answer_only)
    ids = tokenize_texts(read_texts(source, tokenizer=tokenizer), tokenizer, max_tokens=n_tokens)
    return TrainData.plain(ids, str(source))
