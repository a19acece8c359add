"""Depth pruning: remove whole decoder layers chosen by measured importance.

Methods (importance from calibration data):

- ``block_influence`` — ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models
  are More Redundant Than You Expect"): BI_i = 1 - mean cos(x_i, x_{i+1}) between a layer's
  input and output hidden states over calibration tokens; the lowest-BI layers go.
- ``angular`` — Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"):
  for n layers to remove, the contiguous block l..l+n-1 whose input and output are closest in
  angular distance arccos(cos(x_l, x_{l+n})) / pi, averaged over all calibration tokens (the
  paper uses the last token; every token is a lower-variance estimate of the same quantity).
- ``kl`` — measured: skip each layer in turn (its output replaced by its input) and measure
  KL(unpruned || skipped) of the next-token distributions; the layers whose absence costs the
  least go.
- ``last`` — the naive baseline: remove the last n layers (no data needed).

``iterative: true`` (block_influence, kl) removes one layer, re-scores the smaller model and
repeats, so each choice sees the effect of the previous removals.

When to use: a quick, large speed-up (every removed layer is 1/L of the compute); quality drops
faster than with width pruning or quantization, so heal with distillation afterwards.

Sample recipe step::

    - prune.depth: {fraction: 0.25, method: block_influence}
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kompakt.errors import ConfigError
from kompakt.model.arch import decoder_layers
from kompakt.model.loaded import LoadedModel
from kompakt.passes.base import PassContext, PassReport, PassSpec

logger = logging.getLogger(__name__)

METHODS = ("block_influence", "angular", "kl", "last")


@dataclass
class DepthConfig:
    count: int | None = field(default=None, metadata={"doc": "number of layers to remove (or give fraction)"})
    fraction: float | None = field(
        default=None, metadata={"doc": "fraction of the layers to remove, in (0, 1), rounded to nearest"}
    )
    method: str = field(
        default="block_influence", metadata={"doc": f"how layers are chosen: {', '.join(METHODS)}"}
    )
    iterative: bool = field(
        default=False, metadata={"doc": "remove one layer at a time and re-score (block_influence, kl)"}
    )
    max_blocks: int = field(
        default=32, metadata={"doc": "calibration blocks used for scoring (kl runs one forward per layer per block)"}
    )
    batch_size: int = field(default=4, metadata={"doc": "calibration blocks per forward pass"})

    def validate(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ConfigError("prune.depth: give exactly one of count or fraction")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"prune.depth: count must be at least 1, got {self.count}")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"prune.depth: fraction must be in (0, 1), got {self.fraction}")
        if self.method not in METHODS:
            raise ConfigError(f"prune.depth: unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.iterative and self.method not in ("block_influence", "kl"):
            raise ConfigError(
                f"prune.depth: iterative applies to block_influence and kl, not {self.method} "
                "(angular picks one contiguous block; last needs no scores)"
            )
        if self.max_blocks < 1 or self.batch_size < 1:
            raise ConfigError("prune.depth: max_blocks and batch_size must be at least 1")

    def layers_to_remove(self, n_layers: int) -> int:
        n = self.count if self.count is not None else math.floor(self.fraction * n_layers + 0.5)
        if n < 1:
            raise ConfigError(
                f"prune.depth: fraction {self.fraction} of {n_layers} layers removes no layer; "
                "raise fraction or give count"
            )
        if n >= n_layers:
            raise ConfigError(
                f"prune.depth: cannot remove {n} of {n_layers} layers; remove at most {n_layers - 1}"
            )
        return n


# --------------------------------------------------------------------------- scoring


def _hidden_states(model: torch.nn.Module, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Input of every decoder layer and the last layer's output (before the final norm):
    L+1 tensors [batch, seq, hidden] in fp32, captured with hooks (hidden_states from
    transformers carries the final norm on its last entry)."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach().float())

    def last_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden.detach().float())

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        model(input_ids=blocks, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).clamp(-1.0, 1.0)


def _batches(blocks: torch.Tensor, config: DepthConfig, device: torch.device):
    blocks = blocks[: config.max_blocks]
    for start in range(0, blocks.shape[0], config.batch_size):
        yield blocks[start : start + config.batch_size].to(device)


@torch.inference_mode()
def block_influence(loaded: LoadedModel, blocks: torch.Tensor, config: DepthConfig) -> list[float]:
    """ShortGPT block influence of every layer: 1 - mean cosine(input, output)."""
    n = len(decoder_layers(loaded.model))
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    for batch in _batches(blocks, config, loaded.device):
        states = _hidden_states(loaded.model, batch)
        for i in range(n):
            sums[i] += _cosine(states[i], states[i + 1]).double().sum().cpu()
        count += batch.numel()
    return (1.0 - sums / count).tolist()


@torch.inference_mode()
def angular_distances(loaded: LoadedModel, blocks: torch.Tensor, config: DepthConfig, width: int) -> list[float]:
    """Mean angular distance between the input of layer l and of layer l+width, for every l."""
    n = len(decoder_layers(loaded.model))
    starts = n - width + 1
    sums, count = torch.zeros(starts, dtype=torch.float64), 0
    for batch in _batches(blocks, config, loaded.device):
        states = _hidden_states(loaded.model, batch)
        for start in range(starts):
            angle = torch.arccos(_cosine(states[start], states[start + width])) / math.pi
            sums[start] += angle.double().sum().cpu()
        count += batch.numel()
    return (sums / count).tolist()


def _log_probs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)


@torch.inference_mode()
def skip_kl(loaded: LoadedModel, blocks: torch.Tensor, config: DepthConfig, reference=None) -> list[float]:
    """Mean KL(reference || model with layer i skipped) per position, for every layer i.
    `reference` (a model) defaults to the model itself with no layer skipped."""
    layers = decoder_layers(loaded.model)
    reference = loaded.model if reference is None else reference
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    for batch in _batches(blocks, config, loaded.device):
        ref_lp = _log_probs(reference, batch)
        for i, layer in enumerate(layers):
            # Skipping = the layer's output replaced by its input (the residual stream passes by).
            handle = layer.register_forward_hook(_identity_hook, with_kwargs=True)
            try:
                cand_lp = _log_probs(loaded.model, batch)
            finally:
                handle.remove()
            sums[i] += (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1).clamp_min(0).double().sum().cpu()
        count += batch.shape[0] * batch.shape[1]
    return (sums / count).tolist()


def _identity_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# --------------------------------------------------------------------------- choice


def _lowest(scores: list[float], n: int) -> list[int]:
    # Ties broken by the later layer first (deeper layers are the more redundant ones).
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n])


def choose_layers(loaded: LoadedModel, blocks, config: DepthConfig, n: int) -> tuple[list[int], list[float]]:
    """Indices (in the current model) of the n layers to remove, and the scores used."""
    n_layers = len(decoder_layers(loaded.model))
    if config.method == "last":
        return list(range(n_layers - n, n_layers)), []
    if config.method == "angular":
        distances = angular_distances(loaded, blocks, config, n)
        start = min(range(len(distances)), key=lambda s: (distances[s], -s))
        return list(range(start, start + n)), distances
    scores = block_influence(loaded, blocks, config) if config.method == "block_influence" else skip_kl(
        loaded, blocks, config
    )
    return _lowest(scores, n), scores


def apply(ctx: PassContext, config: DepthConfig) -> PassReport:
    from kompakt.model.surgery import drop_layers

    loaded = ctx.loaded
    n_layers = len(decoder_layers(loaded.model))
    n = config.layers_to_remove(n_layers)
    blocks = ctx.calibration() if config.method != "last" else None
    # Iterative KL measures the damage against this step's input model, kept aside once.
    reference = copy.deepcopy(loaded.model) if config.iterative and config.method == "kl" else None
    original_index = list(range(n_layers))  # position in the current model -> original layer number
    removed: list[int] = []
    rounds: list[dict] = []
    while len(removed) < n:
        if reference is not None:
            scores = skip_kl(loaded, blocks, config, reference=reference)
            indices = _lowest(scores, 1)
        else:
            indices, scores = choose_layers(loaded, blocks, config, 1 if config.iterative else n)
        names = [original_index[i] for i in indices]
        rounds.append({"removed": names, "scores": [round(s, 6) for s in scores]})
        removed.extend(names)
        loaded, _ = drop_layers(loaded, indices)
        original_index = [j for k, j in enumerate(original_index) if k not in indices]
    del reference
    removed.sort()
    how = config.method + (", iterative" if config.iterative else "")
    summary = f"removed {n} of {n_layers} layers ({how}): {removed}"
    logger.info("prune.depth: %s", summary)
    details = {"removed_layers": removed, "num_hidden_layers": [n_layers, n_layers - n], "rounds": rounds}
    return PassReport(loaded=loaded, summary=summary, details=details)


PASS = PassSpec(
    name="prune.depth",
    config=DepthConfig,
    apply=apply,
    needs_calibration=True,
    changes_architecture=True,
    doc=__doc__ or "",
)
