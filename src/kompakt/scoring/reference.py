"""Score one-layer edits of a model against a reference, cheaply.

Skip cost and quantization sensitivity edit one decoder layer in place and compare the
model's next-token distributions with the reference's (the unmodified model, or a separate
teacher) on token windows. Two savings make the 2 x n_layers evaluations affordable:

- the reference distributions are computed once and kept, at top-k plus one bucket for the
  rest (kompakt.evaluate.topk), so one forward per edit, not two, no second copy of the model,
  and vocabulary-sized work per edit only in the output layer and one log-sum-exp (the
  full-vocabulary KL ran several [positions, vocab] passes: ~3 s per edit on Gemma 3);
- layers before the edited one see unchanged inputs, so their output is replayed from the
  reference run (the cached input of layer i) instead of recomputed: on average half the
  decoder stack is skipped. The layer modules stay in place (some models read attributes of
  them); only their `forward` is overridden for the duration of a `replay` block, and an
  instance `forward` that was there before (accelerate's offload hooks put one) is put back.

Scoring follows kompakt.evaluate (BENCH.md): each window [batch, window] is scored on the
positions that predict a next token (window - 1 per row); KL(reference || candidate), over
the reference's top-k tokens and one bucket (a lower bound of the full KL, within ~3 % at
k = 1024 on the embedded models), is averaged over those positions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from kompakt.evaluate.topk import TOP_K, TopK, bucketed_kl


@dataclass
class Score:
    """Quality of an edited model on the reference windows."""

    ppl: float
    kl_mean: float
    top1: float

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "kl": self.kl_mean, "top1": self.top1}


@dataclass
class Reference:
    """The reference outputs on token windows (each [batch, window] ids) and the model's layer inputs."""

    windows: list[torch.Tensor]
    distributions: list[TopK]  # per window: [batch x (window - 1)] positions, row-major
    layer_inputs: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][window] -> [batch, window, hidden]
    ppl: float = float("nan")
    tuple_outputs: bool = False  # older transformers return (hidden,) from decoder layers

    @property
    def scored_tokens(self) -> int:
        return sum(len(lp) for lp in self.distributions)


def _exp(value: float) -> float:
    """exp that saturates to inf (a skipped layer can make perplexity astronomically large)."""
    return math.exp(value) if value < 700 else math.inf


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _logits(model: nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [batch x (window - 1), vocab], next tokens [batch x (window - 1)]) of the
    positions that predict a next token."""
    logits = model(input_ids=window, use_cache=False).logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1).to(logits.device)


def _top_k(model: nn.Module, window: torch.Tensor) -> TopK:
    logits, targets = _logits(model, window)
    return TopK.from_logits(logits, targets, TOP_K)


@torch.inference_mode()
def build_reference(
    model: nn.Module, layers: nn.ModuleList, windows: list[torch.Tensor], teacher: nn.Module | None = None
) -> Reference:
    """Run the model once per window, keeping every layer's input and the reference log-probs.

    The log-probs come from `teacher` when given (e.g. the unpruned model while a pruned one is
    scored), else from `model` itself; the layer inputs always come from `model`, whose prefix
    `replay` stands in for.
    """
    reference = Reference(windows=windows, distributions=[], layer_inputs=[[] for _ in layers])
    handles = []

    def capture(index: int):
        def hook(module, args, kwargs, output):
            reference.layer_inputs[index].append(_hidden_from(args, kwargs).detach())
            reference.tuple_outputs = isinstance(output, tuple)

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(capture(index), with_kwargs=True))
    teacher = None if teacher is model else teacher
    nll = 0.0
    try:
        for window in windows:
            if teacher is None:
                top = _top_k(model, window)
            else:
                model(input_ids=window, use_cache=False)  # only for the layer inputs
                top = _top_k(teacher, window)
            reference.distributions.append(top)
            nll -= float(top.target_log_probs.double().sum())
    finally:
        for handle in handles:
            handle.remove()
    reference.ppl = _exp(nll / reference.scored_tokens)
    return reference


@contextmanager
def replay(layers: nn.ModuleList, count: int, reference: Reference, source_layer: int) -> Iterator[list[int]]:
    """Make layers[0:count] return the cached input of layer `source_layer` for the current window.

    Yields a one-element list holding the current window index; `score` sets it. Layers past
    the first ignore their (already replayed) input, so the whole prefix costs nothing.
    """
    current = [0]

    def replayed(*args, **kwargs):
        hidden = reference.layer_inputs[source_layer][current[0]]
        return (hidden,) if reference.tuple_outputs else hidden

    patched = list(layers)[:count]
    missing = object()
    previous = [layer.__dict__.get("forward", missing) for layer in patched]  # e.g. accelerate's hook
    for layer in patched:
        layer.forward = replayed  # instance attribute shadows the class method (or a hook's)
    try:
        yield current
    finally:
        for layer, before in zip(patched, previous):
            if before is missing:
                del layer.forward
            else:
                layer.forward = before


@contextmanager
def skipped(layers: nn.ModuleList, index: int, reference: Reference) -> Iterator[list[int]]:
    """Layer `index` becomes the identity: layers 0..index all return the input of layer `index`."""
    with replay(layers, index + 1, reference, index) as current:
        yield current


@torch.inference_mode()
def score(model: nn.Module, reference: Reference, current: list[int] | None = None) -> Score:
    """Perplexity, KL(reference || model) and top-1 agreement of the (edited) model."""
    nll = kl_sum = 0.0
    agree = 0
    for index, window in enumerate(reference.windows):
        if current is not None:
            current[0] = index
        logits, targets = _logits(model, window)
        scored = bucketed_kl(reference.distributions[index], logits, targets)
        kl_sum += float(scored.kl.double().sum())
        agree += int(scored.agree.sum())
        nll -= float(scored.target_log_probs.double().sum())
    count = reference.scored_tokens
    return Score(ppl=_exp(nll / count), kl_mean=kl_sum / count, top1=agree / count)
