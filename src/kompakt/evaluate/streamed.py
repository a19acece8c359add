"""Perplexity and fidelity (KL, top-1) of models larger than memory: layer by layer over all windows.

    lazy = open_lazy("Llama-2-7b-hf")                         # kompakt.model.lazy: no weight read
    streamed_perplexity(lazy, ids, window=512)
    streamed_fidelity(reference_lazy, candidate, ids, work_dir=tmp)   # either may be lazy or loaded

A lazily opened model is run the way the sequential calibration passes run it (kompakt.calib.capture):
the embedding is materialised and every window's input to decoder layer 0 captured, with the
arguments transformers builds for the layers (masks, rotary tables); then each decoder layer is
materialised once, run on the hidden states of *all* windows and released, so at most one layer
is in memory besides the hidden states of the windows (tokens x hidden); the embedding is released
after the capture and read again with the final norm and the output head for the logits. The logits come from the model's own forward with every layer a
pass-through and the last layer's output put in at layer 0, so the final norm, the head and any
logit soft-capping are transformers' code, not a copy. The windows, their grouping and the scored
positions are those of kompakt.evaluate.perplexity / fidelity, so the numbers are the in-memory
numbers (tests/evaluate/test_streamed_eval.py: within 1e-6 relative; bit-identical on the tiny
families on CPU fp32).

Fidelity keeps the reference's full next-token log-probabilities (what `fidelity`'s KL over the
whole vocabulary needs) in a memory-mapped float32 file in `work_dir` (positions x vocab; 4096
positions of a 32k vocabulary are 0.5 GB of disk), written in one pass over the reference, then
read back in order while the candidate runs; the free space is checked before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kompakt.atomic import check_room
from kompakt.calib.capture import _pass_through, capture_layer_inputs, layer_output
from kompakt.errors import ConfigError
from kompakt.evaluate.fidelity import FidelityResult, _Totals, _windows_for
from kompakt.evaluate.perplexity import PerplexityResult, forward_logits, room_for_window, window_prefix
from kompakt.evaluate.topk import TOP_K, TopK
from kompakt.evaluate.windows import Window, batch_inputs, batches, check_window, plan_windows, prepare_ids, row_log_probs
from kompakt.model.arch import decoder_layers
from kompakt.process_memory import return_freed_memory

logger = logging.getLogger(__name__)


def _is_lazy(model: Any) -> bool:
    from kompakt.model.lazy import lazy_of

    return lazy_of(getattr(model, "model", model)) is not None or hasattr(model, "materialize")


def _net(model: Any) -> torch.nn.Module:
    return model.model if hasattr(model, "model") else model


def _with_prefix(inputs: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    if not prefix:
        return inputs
    head = torch.tensor(prefix, dtype=inputs.dtype).expand(inputs.shape[0], -1)
    return torch.cat([head, inputs], dim=1)


@torch.no_grad()
def streamed_logits(lazy, flat: torch.Tensor, windows: list[Window], prefix: list[int],
                    batch_size: int) -> Iterator[tuple[list[Window], torch.Tensor]]:  # fmt: skip
    """(group of windows, [batch, length, vocab] logits) in the order `batches` gives, computed
    layer by layer over all groups (module docstring); `lazy` is a kompakt.model.lazy.LazyModel."""
    model = lazy.model
    groups = list(batches(windows, batch_size))
    lazy.materialize(lazy.embed_path, torch.float32)
    captured = [capture_layer_inputs(model, _with_prefix(batch_inputs(flat, g, torch.device("cpu")), prefix),
                                     batch_size=len(g)) for g in groups]  # fmt: skip
    hidden = [c.hidden[0] for c in captured]
    lazy.release(lazy.embed_path)  # read again for the head's forward: not held beside the layers (7B: 0.5 GB)
    return_freed_memory()
    for index in range(lazy.n_layers):
        layer = lazy.materialize(lazy.layer_path(index), torch.float32)
        for g, capture in enumerate(captured):
            call = capture.call_for(index, hidden[g], 0)
            hidden[g] = layer_output(layer(hidden[g], *call.args, **call.kwargs))
        lazy.release(lazy.layer_path(index))
        return_freed_memory()
    head_parts = [p for p in (lazy.final_norm_path, lazy.lm_head_path) if p]
    for part in [lazy.embed_path, *head_parts]:  # the model's forward embeds the ids before layer 0 takes `last`
        lazy.materialize(part, torch.float32)
    try:
        for g, group in enumerate(groups):
            logits = _head_logits(model, _with_prefix(batch_inputs(flat, group, torch.device("cpu")), prefix), hidden[g])
            hidden[g] = None  # type: ignore[call-overload]
            yield group, logits[:, len(prefix):]
            del logits  # batch x length x vocab: never two groups' logits at once
            return_freed_memory()
    finally:
        for part in [*head_parts, lazy.embed_path]:
            lazy.release(part)


def _head_logits(model: torch.nn.Module, inputs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The model's own forward from the last layer's output on: every decoder layer a
    pass-through and `last` put in at layer 0, so norm, head and soft-capping run unchanged."""
    layers = decoder_layers(model)

    def put_in(module, args, kwargs):
        if args:
            return (last, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": last}

    handle = layers[0].register_forward_pre_hook(put_in, with_kwargs=True)
    for layer in layers:
        layer.forward = _pass_through
    try:
        return model(input_ids=inputs, use_cache=False).logits
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward


def scored_log_probs(model: Any, flat: torch.Tensor, windows: list[Window], prefix: list[int],
                     batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(targets, fp32 log-probs) of the scored positions in order, in row_log_probs' chunks, for
    a lazy model (streamed) or a loaded one (one forward per group, as `perplexity` runs)."""
    if _is_lazy(model):
        lazy = model if hasattr(model, "materialize") else _lazy(model)
        groups: Iterator = streamed_logits(lazy, flat, windows, prefix, batch_size)
    else:
        net = _net(model)
        device = next(net.parameters()).device
        groups = ((g, forward_logits(net, batch_inputs(flat, g, device), prefix)) for g in batches(windows, batch_size))
    with torch.inference_mode():
        for group, logits in groups:
            for row, item in enumerate(group):
                targets = flat[item.start : item.end]
                for positions, log_probs in row_log_probs(logits[row], item):
                    yield targets[positions], log_probs.cpu()
            del logits


def streamed_reference_topk(reference: Any, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
                            max_tokens: int | None = None, batch_size: int = 4, k: int = TOP_K) -> TopK:  # fmt: skip
    """kompakt.evaluate.fidelity.reference_topk of a reference opened lazily: its distributions on
    the positions `fidelity_topk` scores, kept at top-k, computed layer by layer."""
    _, prefix, _, flat, windows = _windows_for(reference, ids, window, stride, max_tokens)
    # log-probabilities: from_logits normalises them again, unchanged
    return TopK.cat([TopK.from_logits(log_probs, targets, k)
                     for targets, log_probs in scored_log_probs(reference, flat, windows, prefix, batch_size)])  # fmt: skip


def _lazy(model: Any):
    from kompakt.model.lazy import lazy_of

    return lazy_of(getattr(model, "model", model))


def _plan(model: Any, ids: torch.Tensor, window: int, stride: int | None, max_tokens: int | None):
    """(prefix, stride, flat ids, windows) exactly as perplexity / fidelity plan them."""
    prefix = window_prefix(model)
    stride = check_window(window, stride, room_for_window(_net(model), prefix), max_tokens)
    flat = prepare_ids(ids, window, max_tokens)
    return prefix, stride, flat, plan_windows(flat.numel(), window, stride)


def streamed_perplexity(model: Any, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
                        max_tokens: int | None = None, batch_size: int = 4) -> PerplexityResult:  # fmt: skip
    """`kompakt.evaluate.perplexity.perplexity` of a lazily opened model, layer by layer."""
    prefix, stride, flat, windows = _plan(model, ids, window, stride, max_tokens)
    nll, scored = 0.0, 0
    for targets, log_probs in scored_log_probs(model, flat, windows, prefix, batch_size):
        nll -= float(log_probs.gather(-1, targets.unsqueeze(-1)).double().sum())
        scored += int(targets.numel())
    return PerplexityResult(ppl=math.exp(nll / scored), nll_mean=nll / scored, tokens_scored=scored, window=window,
                            stride=stride, tokens_used=int(flat.numel()))  # fmt: skip


def _vocab(model: Any) -> int:
    config = _net(model).config
    return int(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size"))


def streamed_fidelity(reference: Any, candidate: Any, ids: torch.Tensor, *, work_dir: str | Path,
                      window: int = 512, stride: int | None = None, max_tokens: int | None = None,
                      batch_size: int = 4) -> FidelityResult:  # fmt: skip
    """`kompakt.evaluate.fidelity.fidelity` (KL over the full vocabulary, top-1, both
    perplexities) with either model lazily opened: the reference's log-probabilities go to a
    memory-mapped file in `work_dir` first, then the candidate runs (module docstring)."""
    if _vocab(reference) != _vocab(candidate):
        raise ConfigError(f"reference and candidate have different vocabularies ({_vocab(reference)} vs "
                          f"{_vocab(candidate)}); compare models that share a tokenizer")  # fmt: skip
    prefix, stride, flat, windows = _plan(reference, ids, window, stride, max_tokens)
    n, vocab = sum(item.scored for item in windows), _vocab(reference)
    path = Path(work_dir) / "reference-log-probs.f32"
    check_room(path, n * vocab * 4)
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, vocab))
    try:
        done = 0
        for targets, log_probs in scored_log_probs(reference, flat, windows, prefix, batch_size):
            stored[done : done + len(targets)] = log_probs.numpy()
            done += len(targets)
        stored.flush()
        totals, done = _Totals(), 0
        for targets, cand_lp in scored_log_probs(candidate, flat, windows, prefix, batch_size):
            ref_lp = torch.from_numpy(np.asarray(stored[done : done + len(targets)]))
            totals.add(ref_lp, cand_lp, targets)
            done += len(targets)
    finally:
        del stored
        path.unlink(missing_ok=True)
    kl = np.concatenate(totals.kl_chunks)
    return FidelityResult(
        kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), top1=totals.agree / totals.count,
        ppl_reference=math.exp(totals.nll_reference / totals.count),
        ppl_candidate=math.exp(totals.nll_candidate / totals.count), tokens=totals.count, window=window,
        stride=stride, tokens_used=int(flat.numel()),
    )  # fmt: skip
