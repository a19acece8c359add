"""Fidelity of a candidate to its reference: KL(reference || candidate) per position, top-1
agreement, and both perplexities, from one forward of each model per window (BENCH.md).

Two forms of the same measurement:
- `fidelity(reference, candidate, ids)`: both models run, KL over the full vocabulary (the
  BENCH.md protocol number; `kompakt eval`).
- `reference_topk(reference, ids)` once, then `fidelity_topk(topk, candidate, ids)` per
  candidate: the reference's distributions are computed once and kept compactly
  (kompakt.evaluate.topk), KL over its top-k plus the rest as one bucket, a lower bound of the
  full KL (gap stated there). What a recipe run measures after every step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kompakt.errors import ConfigError
from kompakt.evaluate.perplexity import room_for_window, forward_logits, progress_bar, unwrap_model, window_prefix
from kompakt.evaluate.topk import TOP_K, TopK, bucketed_kl, full_kl, kl_label
from kompakt.evaluate.windows import (
    Window,
    batch_inputs,
    batches,
    check_window,
    plan_windows,
    prepare_ids,
    row_log_probs,
)

logger = logging.getLogger(__name__)


@dataclass
class FidelityResult:
    """kl_mean / kl_p99 in nats per position; top1 = fraction of positions with the same argmax."""

    kl_mean: float
    kl_p99: float
    top1: float
    ppl_reference: float
    ppl_candidate: float
    tokens: int
    window: int = 512
    stride: int = 512
    tokens_used: int = 0
    kl_kind: str = kl_label(None)  # how KL was computed (full vocabulary or top-k + rest)
    # A candidate with a trimmed vocabulary (kompakt.evaluate.vocab_map): next tokens it lacks
    # (not compared) and the reference's mean probability on its removed ids.
    positions_removed: int = 0
    removed_mass: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Totals:
    """Running sums; per-position KL kept as small float arrays (for the percentile)."""

    def __init__(self) -> None:
        self.kl_chunks: list[np.ndarray] = []
        self.agree = 0
        self.nll_reference = 0.0
        self.nll_candidate = 0.0
        self.count = 0

    def add(self, ref_lp: torch.Tensor, cand_lp: torch.Tensor, targets: torch.Tensor) -> None:
        kl = full_kl(ref_lp, cand_lp)  # rows = positions, fp32
        self.kl_chunks.append(kl.double().cpu().numpy())
        self.agree += int((ref_lp.argmax(-1) == cand_lp.argmax(-1)).sum())
        index = targets.unsqueeze(-1)
        self.nll_reference -= float(ref_lp.gather(-1, index).double().sum())
        self.nll_candidate -= float(cand_lp.gather(-1, index).double().sum())
        self.count += int(targets.numel())


def _check_pair(reference: torch.nn.Module, candidate: torch.nn.Module) -> None:
    ref_vocab = reference.get_output_embeddings().weight.shape[0]
    cand_vocab = candidate.get_output_embeddings().weight.shape[0]
    if ref_vocab != cand_vocab:
        raise ConfigError(
            f"reference and candidate have different vocabularies ({ref_vocab} vs {cand_vocab}); "
            "compare models that share a tokenizer"
        )


def fidelity(
    reference,
    candidate,
    ids: torch.Tensor,
    *,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> FidelityResult:
    """KL(reference || candidate), top-1 agreement and both perplexities on the same positions.

    Both arguments are LoadedModel or transformers models; they may live on different devices.
    """
    ref_net, cand_net = unwrap_model(reference), unwrap_model(candidate)
    _check_pair(ref_net, cand_net)
    # Same tokenizer (checked above), so both models get the same unscored prefix.
    prefix = window_prefix(reference) or window_prefix(candidate)
    contexts = [c for c in (room_for_window(ref_net, prefix), room_for_window(cand_net, prefix)) if c is not None]
    stride = check_window(window, stride, min(contexts) if contexts else None, max_tokens)
    flat = prepare_ids(ids, window, max_tokens)
    windows = plan_windows(flat.numel(), window, stride)
    ref_device = next(ref_net.parameters()).device
    cand_device = next(cand_net.parameters()).device
    totals = _Totals()
    progress, task = progress_bar("fidelity", len(windows))
    with progress, torch.inference_mode():
        for group in batches(windows, batch_size):
            ref_logits = forward_logits(ref_net, batch_inputs(flat, group, ref_device), prefix)
            cand_logits = forward_logits(cand_net, batch_inputs(flat, group, cand_device), prefix)
            for row, item in enumerate(group):
                targets = flat[item.start : item.end].to(ref_device)
                pairs = zip(row_log_probs(ref_logits[row], item), row_log_probs(cand_logits[row], item))
                for (positions, ref_lp), (_, cand_lp) in pairs:
                    totals.add(ref_lp, cand_lp.to(ref_device), targets[positions])
            del ref_logits, cand_logits
            progress.advance(task, len(group))
    kl = np.concatenate(totals.kl_chunks)
    result = FidelityResult(
        kl_mean=float(kl.mean()),
        kl_p99=float(np.percentile(kl, 99)),
        top1=totals.agree / totals.count,
        ppl_reference=math.exp(totals.nll_reference / totals.count),
        ppl_candidate=math.exp(totals.nll_candidate / totals.count),
        tokens=totals.count,
        window=window,
        stride=stride,
        tokens_used=int(flat.numel()),
    )
    logger.info("fidelity: KL %.5f, top-1 %.4f over %d positions", result.kl_mean, result.top1, result.tokens)
    return result


def _scored_logits(net: torch.nn.Module, flat: torch.Tensor, windows: list[Window], prefix: list[int],
                   batch_size: int, label: str, chunk: int = 256):  # fmt: skip
    """(targets [n], logits [n, vocab]) of the scored positions, window by window in order, in
    chunks of at most `chunk` positions (the same positions `fidelity` scores)."""
    device = next(net.parameters()).device
    vocab = net.get_output_embeddings().weight.shape[0]
    # A batch's logits are batch x window x vocab fp32: cap them at 2^27 values (512 MB), which
    # keeps Gemma 3 (262k vocabulary, window 512) at one window per forward, 30 % faster than 4.
    batch_size = max(1, min(batch_size, 2**27 // (max(w.length for w in windows) * vocab)))
    progress, task = progress_bar(label, len(windows))
    with progress, torch.inference_mode():
        for group in batches(windows, batch_size):
            logits = forward_logits(net, batch_inputs(flat, group, device), prefix)
            for row, item in enumerate(group):
                targets = flat[item.start : item.end].to(device)
                first, last = item.score_from - 1, item.length - 1
                for begin in range(first, last, chunk):
                    stop = min(begin + chunk, last)
                    yield targets[begin + 1 : stop + 1], logits[row, begin:stop]
            del logits
            progress.advance(task, len(group))


def _windows_for(model, ids: torch.Tensor, window: int, stride: int | None, max_tokens: int | None):
    net = unwrap_model(model)
    prefix = window_prefix(model)
    stride = check_window(window, stride, room_for_window(net, prefix), max_tokens)
    flat = prepare_ids(ids, window, max_tokens)
    return net, prefix, stride, flat, plan_windows(flat.numel(), window, stride)


def reference_topk(reference, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 4, k: int = TOP_K) -> TopK:  # fmt: skip
    """The reference's distributions on the positions `fidelity_topk` scores, kept at top-k."""
    net, prefix, _, flat, windows = _windows_for(reference, ids, window, stride, max_tokens)
    parts = [TopK.from_logits(logits, targets, k)
             for targets, logits in _scored_logits(net, flat, windows, prefix, batch_size, "reference")]  # fmt: skip
    return TopK.cat(parts)


def fidelity_topk(reference: TopK, candidate, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
                  max_tokens: int | None = None, batch_size: int = 4) -> FidelityResult:  # fmt: skip
    """`fidelity` against precomputed reference distributions (`reference_topk` with the same
    ids and window settings): one forward of the candidate per window, bucketed KL."""
    net, prefix, stride, flat, windows = _windows_for(candidate, ids, window, stride, max_tokens)
    vocab = net.get_output_embeddings().weight.shape[0]
    if reference.vocab and vocab != reference.vocab:
        raise ConfigError(
            f"reference and candidate have different vocabularies ({reference.vocab} vs {vocab}); "
            "compare models that share a tokenizer"
        )
    if sum(item.scored for item in windows) != len(reference):
        raise ConfigError(f"the reference holds {len(reference)} positions, the text gives "
                          f"{sum(item.scored for item in windows)}; compute it with the same ids and window settings")  # fmt: skip
    kl_chunks, agree, nll, done = [], 0, 0.0, 0
    for targets, logits in _scored_logits(net, flat, windows, prefix, batch_size, "fidelity"):
        scored = bucketed_kl(reference.rows(done, done + len(targets)), logits, targets)
        kl_chunks.append(scored.kl.double().cpu().numpy())
        agree += int(scored.agree.sum())
        nll -= float(scored.target_log_probs.double().sum())
        done += len(targets)
    kl = np.concatenate(kl_chunks)
    result = FidelityResult(
        kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), top1=agree / done,
        ppl_reference=math.exp(-float(reference.target_log_probs.double().mean())), ppl_candidate=math.exp(nll / done),
        tokens=done, window=window, stride=stride, tokens_used=int(flat.numel()), kl_kind=kl_label(reference.k),
    )  # fmt: skip
    logger.info("fidelity (top-%d): KL %.5f, top-1 %.4f over %d positions", reference.k, result.kl_mean, result.top1, done)
    return result
