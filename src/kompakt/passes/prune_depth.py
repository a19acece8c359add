"""Depth pruning: remove whole decoder layers chosen by measured importance.

Methods (importance from calibration data):

- ``block_influence`` — ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models
  are More Redundant Than You Expect"): BI_i = 1 - mean cos(x_i, x_{i+1}) between a layer's
  input and output hidden states over calibration tokens (tokens with a zero input, which have
  no direction, left out); the lowest-BI layers go.
- ``angular`` — Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"):
  for n layers to remove, the contiguous block l..l+n-1 whose input and output are closest in
  angular distance arccos(cos(x_l, x_{l+n})) / pi, averaged over all calibration tokens (the
  paper uses the last token; every token is a lower-variance estimate of the same quantity).
- ``kl`` — measured: skip each layer in turn (its output replaced by its input) and measure
  KL(unpruned || skipped) of the next-token distributions; the layers whose absence costs the
  least go.
- ``last`` — the naive baseline: remove the last n layers (no data needed).
- ``cosine`` — sentence encoders' measured score (kompakt.scoring.encoder_skip): skip each
  layer in turn and measure 1 − mean cosine between the sentence embeddings with and without it
  (the model's own pooling, padding left out); the layers whose absence moves the embeddings
  least go. Encoders only, as ``kl`` is decoders only (an encoder has no next-token
  distribution); block_influence, angular and last work on both, padding left out.

``select: every_other`` is DistilBERT's initialisation (Sanh et al. 2019, "DistilBERT, a
distilled version of BERT": the student takes one layer out of two from the teacher): keep
layers 0, 2, 4, … and remove the others (half of the layers, rounded down); no scores, no data.
Give no other method with it; count / fraction, if given, must equal that half.

Every score comes from kompakt.scoring, the functions `kompakt analyze` reports, so the layers
the analysis ranks least important are the layers this pass removes (ties: the deeper layer).

``iterative: true`` (block_influence, kl) removes one layer, re-scores the smaller model and
repeats, so each choice sees the effect of the previous removals.

Memory: calibration batches go to the device one at a time. block_influence keeps a running sum
per layer, angular the hidden states of one batch (every layer's input); kl keeps one batch's
reference at a time, split into chunks of rows so that every layer's input plus the reference
log-probabilities stay under 1 GiB (kompakt.scoring.skip); iterative kl also keeps one copy of
the step's input model as the reference.

When to use: a quick, large speed-up (every removed layer is 1/L of the compute); quality drops
faster than with width pruning or quantization, so heal with distillation afterwards.

Sample recipe steps::

    - prune.depth: {fraction: 0.25, method: block_influence}
    - prune.depth: {select: every_other}
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import decoder_layers
from kompakt.model.inputs import Batch
from kompakt.model.loaded import LoadedModel
from kompakt.passes.base import PassContext, PassReport, PassSpec
from kompakt.scoring.encoder_skip import skip_cosine_costs
from kompakt.scoring.layers import angular_distances, block_influence, rank_layers
from kompakt.scoring.skip import skip_kl

logger = logging.getLogger(__name__)

METHODS = ("block_influence", "angular", "kl", "cosine", "last")
SELECTS = ("importance", "every_other")


@dataclass
class DepthConfig:
    count: int | None = field(default=None, metadata={"doc": "number of layers to remove (or give fraction)"})
    fraction: float | None = field(
        default=None, metadata={"doc": "fraction of the layers to remove, in (0, 1), rounded to nearest"}
    )
    method: str = field(
        default="block_influence",
        metadata={"doc": f"how layers are scored: {', '.join(METHODS)} (cosine: sentence encoders only)"},
    )
    select: str = field(
        default="importance",
        metadata={"doc": "importance (the lowest-scored layers go) or every_other (keep 0, 2, 4, ...: DistilBERT)"},
    )
    iterative: bool = field(
        default=False, metadata={"doc": "remove one layer at a time and re-score (block_influence, kl)"}
    )
    max_blocks: int = field(
        default=32, metadata={"doc": "calibration blocks used for scoring (kl runs one forward per layer per block)"}
    )
    batch_size: int = field(default=4, metadata={"doc": "calibration blocks per forward pass"})

    def uses_calibration(self) -> bool:
        """method: last and select: every_other choose layers by position, without data."""
        return self.method != "last" and self.select != "every_other"

    def validate(self) -> None:
        if self.select not in SELECTS:
            raise ConfigError(f"prune.depth: unknown select {self.select!r}; valid: {', '.join(SELECTS)}")
        if self.select == "every_other":
            if self.method != "block_influence" or self.iterative:
                raise ConfigError("prune.depth: select: every_other chooses the layers itself; drop method / iterative")
            if self.count is not None and self.fraction is not None:
                raise ConfigError("prune.depth: give at most one of count or fraction")
        elif (self.count is None) == (self.fraction is None):
            raise ConfigError("prune.depth: give exactly one of count or fraction")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"prune.depth: count must be at least 1, got {self.count}")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"prune.depth: fraction must be in (0, 1), got {self.fraction}")
        if self.method not in METHODS:
            raise ConfigError(f"prune.depth: unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.iterative and self.method not in ("block_influence", "kl", "cosine"):
            raise ConfigError(
                f"prune.depth: iterative applies to block_influence, kl and cosine, not {self.method} "
                "(angular picks one contiguous block; last needs no scores)"
            )
        if self.max_blocks < 1 or self.batch_size < 1:
            raise ConfigError("prune.depth: max_blocks and batch_size must be at least 1")

    def layers_to_remove(self, n_layers: int) -> int:
        if self.select == "every_other":
            half = n_layers // 2
            given = self.count if self.count is not None else (
                None if self.fraction is None else math.floor(self.fraction * n_layers + 0.5))  # fmt: skip
            if given is not None and given != half:
                raise ConfigError(f"prune.depth: every_other removes {half} of {n_layers} layers, not {given}; "
                                  "drop count / fraction or give that")  # fmt: skip
            if half < 1:
                raise ConfigError(f"prune.depth: every_other needs at least 2 layers; the model has {n_layers}")
            return half
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


def _batches(blocks: Batch, config: DepthConfig, device: torch.device) -> Iterator[Batch]:
    """The calibration batches (token blocks or padded sentences), each moved to the device only
    when it is scored."""
    for batch in blocks[: config.max_blocks].split(config.batch_size):
        yield batch.to(device)


def method_for(loaded: LoadedModel, config: DepthConfig) -> str:
    """The scoring method; ConfigError when it needs what this kind of model does not produce."""
    method = config.method
    if method == "kl" and loaded.is_encoder:
        raise ConfigError("prune.depth: method kl compares next-token distributions, which an encoder does not "
                          "produce; use method: cosine (the sentence-embedding skip score)")  # fmt: skip
    if method == "cosine" and not loaded.is_encoder:
        raise ConfigError("prune.depth: method cosine scores sentence embeddings, which a causal LM does not "
                          "produce; use method: kl")  # fmt: skip
    return method


def layer_scores(
    loaded: LoadedModel, blocks: torch.Tensor, config: DepthConfig, teacher: torch.nn.Module | None = None
) -> list[float]:
    """block_influence or kl score of every layer of the current model (kompakt.scoring, the
    functions `kompakt analyze` reports); `teacher` is the KL reference (default: the model)."""
    model, layers = loaded.model, decoder_layers(loaded.model)
    batches = _batches(blocks, config, loaded.device)
    method = method_for(loaded, config)
    if method == "block_influence":
        return block_influence(model, layers, batches)
    if method == "cosine":  # against the model itself: iterative cosine re-scores the smaller model
        return skip_cosine_costs(model, layers, batches, loaded.pooling)
    return skip_kl(model, layers, batches, teacher=teacher)


# --------------------------------------------------------------------------- choice


def _lowest(scores: list[float], n: int) -> list[int]:
    return sorted(rank_layers(scores)[:n])


def choose_layers(loaded: LoadedModel, blocks, config: DepthConfig, n: int) -> tuple[list[int], list[float]]:
    """Indices (in the current model) of the n layers to remove, and the scores used."""
    model, layers = loaded.model, decoder_layers(loaded.model)
    if config.select == "every_other":
        return list(range(1, len(layers), 2))[:n], []
    method = method_for(loaded, config)
    if method == "last":
        return list(range(len(layers) - n, len(layers))), []
    if method == "angular":
        distances = angular_distances(model, layers, _batches(blocks, config, loaded.device), n)
        start = rank_layers(distances)[0]  # the block start whose ends are closest; ties: the deeper
        return list(range(start, start + n)), distances
    scores = layer_scores(loaded, blocks, config)
    return _lowest(scores, n), scores


def apply(ctx: PassContext, config: DepthConfig) -> PassReport:
    from kompakt.model.surgery import drop_layers

    loaded = ctx.loaded
    n_layers = len(decoder_layers(loaded.model))
    n = config.layers_to_remove(n_layers)
    method = "every_other" if config.select == "every_other" else method_for(loaded, config)
    blocks = ctx.calibration() if config.uses_calibration() else None
    # Iterative KL measures the damage against this step's input model, kept aside once.
    reference = copy.deepcopy(loaded.model) if config.iterative and method == "kl" else None
    original_index = list(range(n_layers))  # position in the current model -> original layer number
    removed: list[int] = []
    rounds: list[dict] = []
    while len(removed) < n:
        if reference is not None:
            scores = layer_scores(loaded, blocks, config, teacher=reference)
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
    how = method + (", iterative" if config.iterative else "")
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
