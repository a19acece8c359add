"""Expert merging: fold each MoE layer's experts into fewer, instead of removing them.

MC-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its
Routing Policy"): the most often routed experts (routing frequency over the calibration data,
kompakt.scoring.experts) lead the groups; every other expert joins the leader whose router row
is most similar (cosine: the weight-only form of MC-SMoE's router-logit similarity). Within a
group each member's intermediate neurons are permuted to match the leader's (Hungarian matching
of the neurons' gate / up / down weight vectors; permuting an expert's neurons does not change
what it computes), then the group becomes one expert, the frequency-weighted average of its
aligned members (kompakt.ops.moe_experts).

Router: the merged expert's router row is the leader's row (`router: dominant`, default: tokens
that chose the leader still do; MC-SMoE keeps the dominant expert's routing) or the members'
frequency-weighted mean row (`router: mean`). The router keeps one row per merged expert.

`groups` gives the plan by hand (every layer the same): a list of expert groups that together
hold every expert exactly once (the most often routed member leads). A plan that leaves an
expert out (its router row would point nowhere) or names one twice is a one-line error before
anything changes; so is one that keeps fewer experts than top-k.

When to use: as moe.prune, where the removed experts still carry knowledge the survivors lack.
REAP (Lasby et al. 2025) measured merging losing to REAP pruning at 50 % on generative tasks
(a merged expert loses the router's separate control of its members); bench/moe.py compares them.

Sample recipe step::

    - moe.merge: {fraction: 0.5}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import decoder_layers
from kompakt.model.moe import ExpertTensors, get_experts, moe_spec, num_experts, require_all_sparse, set_experts, top_k
from kompakt.ops.moe_experts import check_plan, group_by_router, merge_group, merged_router
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.passes.moe_prune import experts_to_remove, routing_stats

logger = logging.getLogger(__name__)

ROUTER_RULES = ("dominant", "mean")


@dataclass
class MoEMergeConfig:
    fraction: float | None = field(default=None, metadata=doc("fraction of each layer's experts merged away, in (0, 1)"))
    count: int | None = field(default=None, metadata=doc("experts merged away per layer (or give fraction / groups)"))
    groups: list | None = field(
        default=None, metadata=doc("the plan by hand: groups of expert indices covering every expert once")
    )
    router: str = field(default="dominant", metadata=doc(f"merged expert's router row: {', '.join(ROUTER_RULES)}"))
    max_blocks: int = field(default=32, metadata=doc("calibration blocks for the routing frequencies"))
    batch_size: int = field(default=4, metadata=doc("calibration blocks per forward pass"))

    def validate(self) -> None:
        given = sum(x is not None for x in (self.fraction, self.count, self.groups))
        if given != 1:
            raise ConfigError("moe.merge: give exactly one of fraction, count or groups")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"moe.merge: count must be at least 1, got {self.count}")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"moe.merge: fraction must be in (0, 1), got {self.fraction}")
        if self.groups is not None and not all(
            isinstance(g, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in g) for g in self.groups
        ):
            raise ConfigError("moe.merge: groups must be a list of lists of expert indices, e.g. [[0, 3], [1], [2]]")
        if self.router not in ROUTER_RULES:
            raise ConfigError(f"moe.merge: unknown router rule {self.router!r}; valid: {', '.join(ROUTER_RULES)}")
        if self.max_blocks < 1 or self.batch_size < 1:
            raise ConfigError("moe.merge: max_blocks and batch_size must be at least 1")


def check_groups(groups: list[list[int]], total: int, k: int) -> None:
    """A hand-written plan: every expert in exactly one group, at least top-k groups."""
    problem = check_plan(groups, total)
    if problem:
        raise ConfigError(f"moe.merge: bad groups: {problem}; list every expert 0..{total - 1} exactly once")
    if len(groups) < k:
        raise ConfigError(f"moe.merge: {len(groups)} groups leave fewer experts than top-k {k}; give at least {k} groups")


def _led_by_frequency(groups: list[list[int]], frequency: np.ndarray) -> list[list[int]]:
    """Each group with its most often routed member first (ties: the lower index)."""
    return [sorted(g, key=lambda e: (-float(frequency[e]), e)) for g in groups]


def merge_layer(tensors: ExpertTensors, groups: list[list[int]], frequency: torch.Tensor, rule: str) -> ExpertTensors:
    """One layer's merged experts and router (groups lead with their dominant expert)."""
    merged = [merge_group(tensors.gate_up, tensors.down, g, frequency[g]) for g in groups]
    return ExpertTensors(
        torch.stack([gu for gu, _ in merged]),
        torch.stack([d for _, d in merged]),
        merged_router(tensors.router, groups, frequency, rule),
    )


def apply(ctx: PassContext, config: MoEMergeConfig) -> PassReport:
    loaded = ctx.loaded
    moe_spec(loaded)
    require_all_sparse(loaded)
    total, k = num_experts(loaded), top_k(loaded)
    if config.groups is not None:
        check_groups(config.groups, total, k)
        n_groups = len(config.groups)
    else:
        n_groups = total - experts_to_remove("moe.merge", config.fraction, config.count, total, k)
    stats = routing_stats(ctx, config.max_blocks, config.batch_size)
    new_layers, plans = [], []
    for layer, frequency in zip(decoder_layers(loaded), stats.frequency, strict=True):
        tensors = get_experts(layer, moe_spec(loaded))
        freq = torch.as_tensor(np.asarray(frequency), dtype=torch.float64)
        if config.groups is not None:
            groups = _led_by_frequency(config.groups, np.asarray(frequency))
        else:
            groups = group_by_router(tensors.router, freq, n_groups)
        plans.append(groups)
        new_layers.append(merge_layer(tensors, groups, freq, config.router))
    set_experts(loaded, new_layers)
    summary = f"merged {total} experts into {n_groups} per layer (frequency-weighted, neuron-aligned; router {config.router})"
    logger.info("moe.merge: %s", summary)
    details = {"num_experts": [total, n_groups], "groups": plans, "router": config.router,
               "routing_entropy": round(float(np.mean(stats.token_entropy)), 4)}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary, details=details)


PASS = PassSpec(
    name="moe.merge",
    config=MoEMergeConfig,
    apply=apply,
    needs_calibration=True,
    changes_architecture=True,
    decoder_only="it merges experts of Mixture-of-Experts decoders; sentence encoders have none",
    moe_only="it merges experts and remaps routers",
    doc=__doc__ or "",
)
