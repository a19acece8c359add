"""Which windows to run over a token stream and which positions of each to score.

Shared by perplexity and fidelity so both score exactly the same positions (BENCH.md).
The scheme is the Hugging Face sliding-window one: window k starts at k * stride, is at most
`window` tokens long, and scores only the tokens no earlier window scored; a token is scored
from the logits of the position before it, so the first window scores all but its first
token. With stride == window this is "consecutive non-overlapping windows, each scored on its
last window - 1 positions".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from kompakt.errors import ConfigError, DataError


@dataclass(frozen=True)
class Window:
    """One model input: ids[start:end]; targets at window offsets [score_from, end - start)."""

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def scored(self) -> int:
        return self.length - self.score_from


def context_length(model: torch.nn.Module) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when it does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = getattr(config, "get_text_config", lambda: config)()
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def check_window(
    window: int, stride: int | None, context: int | None, max_tokens: int | None = None
) -> int:
    """Raise ConfigError for window/stride/max_tokens combinations that cannot be evaluated;
    return the stride to use (None = window: non-overlapping windows)."""
    stride = window if stride is None else stride
    if window < 2:
        raise ConfigError(f"--window must be at least 2 tokens (got {window})")
    if stride < 1 or stride > window:
        raise ConfigError(f"--stride must be between 1 and the window ({window}); got {stride}")
    if context is not None and window > context:
        raise ConfigError(
            f"window {window} is longer than the model's context ({context} tokens); "
            f"use --window {context} or less"
        )
    if max_tokens is not None and max_tokens < window:
        raise ConfigError(f"--max-tokens {max_tokens} is shorter than one window; use at least {window}")
    return stride


def prepare_ids(ids: torch.Tensor, window: int, max_tokens: int | None) -> torch.Tensor:
    """Flatten to 1-D, cut to max_tokens, and check there is at least one window of text."""
    flat = torch.as_tensor(ids).reshape(-1).long()
    if max_tokens is not None:
        flat = flat[:max_tokens]
    if flat.numel() < window:
        raise DataError(
            f"the text has {flat.numel()} tokens, fewer than one window of {window}; "
            "give more text or a smaller --window"
        )
    return flat


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows over n_tokens tokens; each token except the first is scored exactly once
    (stride < window) or every token except each window's first (stride == window)."""
    windows: list[Window] = []
    previous_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + window, n_tokens)
        new_tokens = end - previous_end
        score_from = max(1, (end - start) - new_tokens)
        if end - start - score_from > 0:
            windows.append(Window(start, end, score_from))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group windows of equal length (all but perhaps the tail) into batches of batch_size."""
    by_length: dict[int, list[Window]] = {}
    for item in windows:
        by_length.setdefault(item.length, []).append(item)
    for group in by_length.values():
        for index in range(0, len(group), max(1, batch_size)):
            yield group[index : index + batch_size]


def batch_inputs(ids: torch.Tensor, group: list[Window], device: torch.device) -> torch.Tensor:
    """[len(group), length] input ids on device."""
    return torch.stack([ids[item.start : item.end] for item in group]).to(device)


def row_log_probs(logits_row: torch.Tensor, item: Window, chunk: int = 256) -> Iterator[tuple[slice, torch.Tensor]]:
    """fp32 log-probabilities of the scored positions of one window, in chunks of positions.

    logits_row is [length, vocab]; position p predicts token p + 1, so target offsets
    [score_from, length) come from logits rows [score_from - 1, length - 1). Chunking keeps
    the fp32 copy at chunk x vocab instead of length x vocab.
    """
    first, last = item.score_from - 1, item.length - 1
    for begin in range(first, last, chunk):
        stop = min(begin + chunk, last)
        yield slice(begin + 1, stop + 1), torch.log_softmax(logits_row[begin:stop].float(), dim=-1)
