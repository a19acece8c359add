"""Perplexity over a token stream with a stated window and stride (protocol in BENCH.md)."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass

import torch
from rich.progress import Progress

from kompakt.model.tokens import prefix_ids
from kompakt.evaluate.windows import (
    batch_inputs,
    batches,
    check_window,
    context_length,
    plan_windows,
    prepare_ids,
    row_log_probs,
)

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """exp(mean NLL) over tokens_scored positions of the first tokens_used tokens."""

    ppl: float
    nll_mean: float
    tokens_scored: int
    window: int
    stride: int
    tokens_used: int

    def to_dict(self) -> dict:
        return asdict(self)


def unwrap_model(model) -> torch.nn.Module:
    """Accept a LoadedModel or a bare transformers model."""
    return getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model


def window_prefix(model) -> list[int]:
    """Ids every window starts with, unscored: what the tokenizer puts before text (<bos> for
    Gemma, which needs it: WikiText-2 ppl ~19 with it, ~53 without; nothing for SmolLM2)."""
    tokenizer = getattr(model, "tokenizer", None)
    return prefix_ids(tokenizer) if tokenizer is not None else []


def forward_logits(
    model: torch.nn.Module, inputs: torch.Tensor, prefix: list[int] | None = None
) -> torch.Tensor:
    """[batch, length, vocab] logits of one batch of windows (no cache, no padding); a prefix
    (e.g. <bos>) is run in front of every window and its logits dropped."""
    if prefix:
        head = torch.tensor(prefix, dtype=inputs.dtype, device=inputs.device).expand(inputs.shape[0], -1)
        return model(input_ids=torch.cat([head, inputs], dim=1), use_cache=False).logits[:, len(prefix) :]
    return model(input_ids=inputs, use_cache=False).logits


def room_for_window(net: torch.nn.Module, prefix: list[int]) -> int | None:
    """Context left for a window once the prefix is in front of it."""
    context = context_length(net)
    return None if context is None else context - len(prefix)


def progress_bar(description: str, total: int) -> tuple[Progress, object]:
    """A transient rich progress bar on stderr, silent when stderr is not a terminal."""
    progress = Progress(transient=True, disable=not sys.stderr.isatty())
    task = progress.add_task(description, total=total)
    return progress, task


def perplexity(
    model,
    ids: torch.Tensor,
    *,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> PerplexityResult:
    """Perplexity of `model` (LoadedModel or transformers model) on `ids` (1-D token ids).

    Raises:
        ConfigError: window longer than the model's context, or a bad stride.
        DataError: fewer tokens than one window.
    """
    net = unwrap_model(model)
    prefix = window_prefix(model)
    stride = check_window(window, stride, room_for_window(net, prefix), max_tokens)
    flat = prepare_ids(ids, window, max_tokens)
    windows = plan_windows(flat.numel(), window, stride)
    device = next(net.parameters()).device
    total_nll = 0.0
    scored = 0
    progress, task = progress_bar("perplexity", len(windows))
    with progress, torch.inference_mode():
        for group in batches(windows, batch_size):
            logits = forward_logits(net, batch_inputs(flat, group, device), prefix)
            for row, item in enumerate(group):
                targets = flat[item.start : item.end].to(device)
                for positions, log_probs in row_log_probs(logits[row], item):
                    picked = log_probs.gather(-1, targets[positions].unsqueeze(-1))
                    total_nll -= float(picked.double().sum())
                scored += item.scored
            del logits
            progress.advance(task, len(group))
    nll_mean = total_nll / scored
    logger.info("perplexity %.4f over %d scored tokens", math.exp(nll_mean), scored)
    return PerplexityResult(
        ppl=math.exp(nll_mean),
        nll_mean=nll_mean,
        tokens_scored=scored,
        window=window,
        stride=stride,
        tokens_used=int(flat.numel()),
    )
