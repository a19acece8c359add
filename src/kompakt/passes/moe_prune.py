"""Expert pruning: remove whole experts of every Mixture-of-Experts layer, with their router rows.

REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression"):
an expert's saliency is the mean, over the calibration tokens the router sends to it, of its gate
value times the norm of its output, g_e(x) * ||f_e(x)||; the least salient experts of each layer
go. The router keeps the rows of the surviving experts, so each token is routed among them as
before (softmax over fewer logits; the family's top-k renormalisation, if any, unchanged). REAP
found pruning this way beats merging at 50 % on large MoEs (near-lossless on code / generation),
because a merged expert loses the router's independent control of its members.

REAP's score is a mean over the routed tokens, so it ignores how often an expert is chosen. The
MoEs REAP was measured on were trained with a load-balancing loss that makes the routing shares
nearly equal, and with routers sharp enough for the gate to carry information. On bench/moe.py's
upcycled SmolLM2 MoE (50 % removed, KL to the MoE, `--parts scores`): where the shares differ
(CV 0.27-0.29 across a layer's experts) frequency beats REAP at every router sharpness (0.75 vs
0.90, 0.26 vs 0.32, 0.24 vs 0.28); with the router refitted to balanced shares
(`upcycle(balance=True)`) and sharp, REAP ties it (0.302 vs 0.304, 0.276 vs 0.273), and after
20k tokens of distill.kd it leads (0.177 vs 0.198; merging 0.208). It follows the
reference implementation (CerebrasResearch/reap, observer.py); prefer frequency on an MoE whose
routing shares differ (`kompakt analyze` shows them).

`method: frequency` is the baseline: the experts the fewest calibration tokens are routed to go.
Both scores come from kompakt.scoring.experts, the numbers `kompakt analyze` shows for an MoE.
Ties go to the higher expert index (the lower one is kept), so the plan is deterministic.

The same number of experts goes in every layer (a standard config transformers and llama.cpp
load: `num_experts` / `num_local_experts` updated); at least top-k experts must stay, else a
one-line error before anything is changed (lower top-k first with moe.topk).

When to use: an MoE whose memory (all experts) is the problem; the compute per token is unchanged
(still top-k experts). Heal with distill.kd afterwards.

Sample recipe step::

    - moe.prune: {fraction: 0.5, method: reap}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kompakt.errors import ConfigError
from kompakt.model.inputs import Batch
from kompakt.model.loaded import LoadedModel
from kompakt.model.moe import keep_experts, moe_spec, num_experts, renormalizes, require_all_sparse, top_k
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc

logger = logging.getLogger(__name__)

METHODS = ("reap", "frequency")


@dataclass
class MoEPruneConfig:
    fraction: float | None = field(default=None, metadata=doc("fraction of each layer's experts to remove, in (0, 1)"))
    count: int | None = field(default=None, metadata=doc("experts to remove per layer (or give fraction)"))
    method: str = field(default="reap", metadata=doc(f"how experts are scored: {', '.join(METHODS)}"))
    renormalize: bool = field(
        default=False, metadata=doc("REAP gate: softmax renormalised over the chosen top-k (default: over all experts)")
    )
    max_blocks: int = field(default=32, metadata=doc("calibration blocks used for the routing statistics"))
    batch_size: int = field(default=4, metadata=doc("calibration blocks per forward pass"))

    def validate(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ConfigError("moe.prune: give exactly one of count or fraction")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"moe.prune: count must be at least 1, got {self.count}")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"moe.prune: fraction must be in (0, 1), got {self.fraction}")
        if self.method not in METHODS:
            raise ConfigError(f"moe.prune: unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.max_blocks < 1 or self.batch_size < 1:
            raise ConfigError("moe.prune: max_blocks and batch_size must be at least 1")


def experts_to_remove(name: str, fraction: float | None, count: int | None, n_experts: int, k: int) -> int:
    """How many experts go per layer; ConfigError (one line) when fewer than top-k would stay."""
    n = count if count is not None else math.floor(fraction * n_experts + 0.5)
    if n < 1:
        raise ConfigError(f"{name}: fraction {fraction} of {n_experts} experts removes none; raise fraction or give count")
    if n_experts - n < k:
        raise ConfigError(
            f"{name}: removing {n} of {n_experts} experts leaves {n_experts - n}, fewer than top-k {k}; "
            f"remove at most {n_experts - k} (or lower top-k first with moe.topk)"
        )
    return n


def calibration_batches(loaded: LoadedModel, blocks: Batch, max_blocks: int, batch_size: int) -> Iterator[Batch]:
    """The calibration batches, each moved to the model's device only when it runs."""
    for batch in blocks[:max_blocks].split(batch_size):
        yield batch.to(loaded.device)


def routing_stats(ctx: PassContext, max_blocks: int, batch_size: int, renormalize: bool = False):
    """kompakt.scoring.experts statistics of the step's model over its calibration data."""
    from kompakt.scoring.experts import expert_stats

    batches = calibration_batches(ctx.loaded, ctx.calibration(), max_blocks, batch_size)
    return expert_stats(ctx.loaded.model, batches, renormalize=renormalize)


def lowest(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the n lowest scores; ties: the higher index goes first."""
    order = sorted(range(len(scores)), key=lambda e: (float(scores[e]), -e))
    return sorted(order[:n])


def apply(ctx: PassContext, config: MoEPruneConfig) -> PassReport:
    loaded = ctx.loaded
    moe_spec(loaded)  # a dense model: one-line ConfigError
    require_all_sparse(loaded)
    total, k = num_experts(loaded), top_k(loaded)
    n = experts_to_remove("moe.prune", config.fraction, config.count, total, k)
    stats = routing_stats(ctx, config.max_blocks, config.batch_size, config.renormalize)
    scores = stats.reap if config.method == "reap" else stats.frequency
    removed = [lowest(np.asarray(layer_scores), n) for layer_scores in scores]
    keep = [[e for e in range(total) if e not in gone] for gone in removed]
    keep_experts(loaded, keep)
    summary = f"removed {n} of {total} experts per layer ({config.method}); top-k {k}"
    logger.info("moe.prune: %s", summary)
    details = {
        "num_experts": [total, total - n],
        "removed_experts": removed,
        "method": config.method,
        "renormalized_topk": renormalizes(loaded),
        "routing_entropy": round(float(np.mean(stats.token_entropy)), 4),  # nats, mean over layers
    }
    return PassReport(loaded=loaded, summary=summary, details=details)


PASS = PassSpec(
    name="moe.prune",
    config=MoEPruneConfig,
    apply=apply,
    needs_calibration=True,
    changes_architecture=True,
    decoder_only="it removes experts of Mixture-of-Experts decoders; sentence encoders have none",
    moe_only="it edits experts and routers",
    doc=__doc__ or "",
)
