"""Capture what decoder layer 0 receives for calibration blocks, so each layer can run alone.

The layer-by-layer (sequential) passes — SparseGPT, Wanda, GPTQ, AWQ — never run the whole
model on the calibration set. They need, per calibration batch, the hidden states entering
layer 0 and the keyword arguments every layer is called with (attention mask, rotary
position embeddings (cos, sin), position ids, cache = None, ...). transformers builds those
inside the model's forward, so they are captured with forward pre-hooks:

- Hidden states: a pre-hook on layer 0 records its input and raises `_StopForward`, so the
  rest of the model (and the lm_head's [batch, len, vocab] logits) never runs.
- Keyword arguments: they differ between layers only by layer type (Gemma 2/3 and Qwen 2
  alternate sliding-window and full attention, with a different mask and, for Gemma 3, a
  different rotary base per type) and they depend on the batch *shape* (an eager mask is
  [batch, 1, len, len]), never on the token values (no padding: every block is full). So for
  the first batch of each distinct shape (at most two: full batches and a smaller last one)
  the forward runs through all layers with a pre-hook on each recording its kwargs, and
  stops at the last layer's pre-hook; the layers themselves are replaced by a pass-through
  meanwhile (their outputs are not needed), so this costs no layer computation. Layers of one type share the same mask / cos-sin
  tensor objects, so storing a reference per layer costs no memory. Capturing kwargs at every
  layer for every batch instead would hold one mask per batch per layer type; deriving them
  from `config.layer_types` would put architecture knowledge here.
- Padded sentences (an encoder's calibration form, kompakt.model.inputs.SentenceBatch): the
  attention mask depends on where each row's padding starts, not on the shape, so the kwargs
  are recorded for every batch (one pass-through forward each: the embeddings only), and each
  batch's token mask is kept so statistics leave the padding out.

This is generic: no family is named; whatever the layers receive is replayed verbatim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kompakt.model.arch import decoder_layers
from kompakt.model.inputs import Batch, SentenceBatch, model_inputs, token_mask

BatchKey = tuple[int, ...]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what is needed has been recorded."""


@dataclass
class LayerCall:
    """Everything a decoder layer is called with except its hidden-states input."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CapturedInputs:
    """Inputs of decoder layer 0 and the per-layer call arguments, for every calibration batch.

    Attributes:
        hidden: one tensor [batch, len, hidden] per calibration batch, in the model's compute
            dtype on the model's device.
        calls: batch shape (batch, len) -> one LayerCall per decoder layer; for padded sentences
            (batch, len, batch index): their masks differ from batch to batch.
        keys: the key into `calls` of every calibration batch, in order.
        masks: per batch, [batch, len] bool at the real tokens, or None (no padding).
    """

    hidden: list[torch.Tensor]
    calls: dict[BatchKey, list[LayerCall]]
    keys: list[BatchKey] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def call_for(self, layer_index: int, hidden: torch.Tensor, batch: int | None = None) -> LayerCall:
        """The arguments layer `layer_index` needs for calibration batch `batch` (None: any batch
        shaped like `hidden`, for unpadded blocks whose arguments depend on the shape only)."""
        key = self.keys[batch] if batch is not None and self.keys else ()
        if len(key) <= 2:  # unpadded: the arguments of any batch of this shape
            key = tuple(hidden.shape[:2])
        return self.calls[key][layer_index]

    def mask(self, batch: int) -> torch.Tensor | None:
        """Batch `batch`'s real-token mask [batch, len] (None: every position is a token)."""
        return self.masks[batch] if self.masks else None

    @property
    def n_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def to(self, device: torch.device) -> CapturedInputs:
        """These inputs on `device` (a streamed model's layers run on a GPU): hidden states, masks
        and every call's tensors; a tensor the layers of one type share stays one tensor."""
        moved: dict[int, torch.Tensor] = {}

        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if id(value) not in moved:
                    moved[id(value)] = value.to(device)
                return moved[id(value)]
            if isinstance(value, (tuple, list)):
                return type(value)(move(item) for item in value)
            if isinstance(value, dict):
                return {key: move(item) for key, item in value.items()}
            return value

        calls = {key: [LayerCall(move(c.args), move(c.kwargs)) for c in layer_calls]
                 for key, layer_calls in self.calls.items()}  # fmt: skip
        return CapturedInputs(move(self.hidden), calls, list(self.keys), move(self.masks))


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first materialised parameter's device (a streamed model
    (kompakt.model.lazy) keeps the parts it is not using on the meta device)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _hidden_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Split a layer call into (hidden states, other positional args, other kwargs)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, blocks: Batch, *, batch_size: int = 8) -> CapturedInputs:
    """Run `blocks` [n, len] (token ids or padded sentences) up to layer 0 and record its inputs.

    Args:
        model: a transformers model (or LoadedModel.model) of a family in the arch table.
        blocks: calibration token blocks or a SentenceBatch; split into batches of `batch_size` rows.
        batch_size: rows per forward; larger is faster, memory is [batch, len, hidden] per layer.
    """
    layers = decoder_layers(model)
    device = model_device(model)
    hidden: list[torch.Tensor] = []
    calls: dict[BatchKey, list[LayerCall]] = {}
    keys: list[BatchKey] = []
    masks: list[torch.Tensor | None] = []
    state: dict[str, Any] = {"key": None, "record": False}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            states, rest_args, rest_kwargs = _hidden_arg(args, kwargs)
            if index == 0:
                hidden.append(states.detach())
            if state["record"]:
                calls[state["key"]][index] = LayerCall(rest_args, rest_kwargs)
            if not state["record"] or index == len(layers) - 1:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:  # while kwargs are recorded the layers pass their input on uncomputed
        layer.forward = _pass_through
    try:
        for index, batch in enumerate(blocks.split(batch_size)):
            per_batch = (index,) if isinstance(batch, SentenceBatch) else ()
            state["key"] = (*batch.shape[:2], *per_batch)
            state["record"] = state["key"] not in calls
            if state["record"]:
                calls[state["key"]] = [LayerCall() for _ in layers]
            keys.append(state["key"])
            batch = batch.to(device)
            mask = token_mask(batch)
            masks.append(mask)
            try:
                model(**model_inputs(batch))
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
        for handle in handles:
            handle.remove()
    return CapturedInputs(hidden=hidden, calls=calls, keys=keys, masks=masks if any(m is not None for m in masks) else [])


def _pass_through(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A decoder layer's stand-in while the call arguments of every layer are recorded: what the
    layers receive besides the hidden states (masks, rotary tables) is built by the model before
    its layer loop, so their outputs are not needed and a full forward per batch shape is saved."""
    return _hidden_arg(args, kwargs)[0]


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor in transformers 5, a tuple before)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    layer_index: int,
    captured: CapturedInputs,
    inputs: list[torch.Tensor],
    before: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Run decoder layer `layer_index` alone on every batch of `inputs`; its outputs per batch.
    `before(i)` is called before batch i (the driver's layer caches key their records by it)."""
    outputs = []
    for batch, states in enumerate(inputs):
        if before is not None:
            before(batch)
        call = captured.call_for(layer_index, states, batch)
        outputs.append(layer_output(layer(states, *call.args, **call.kwargs)))
    return outputs
