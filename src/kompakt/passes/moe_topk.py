"""Fewer experts per token: route every token to k experts instead of the model's top-k.

The compute of each MoE layer scales with the experts a token visits, so top-2 -> top-1 halves the
expert FLOPs (memory is unchanged: every expert stays; pair with moe.prune for that). The router
is untouched; only `num_experts_per_tok` (and the routers' cached copies) change.

Renormalisation: families that renormalise the chosen top-k probabilities to sum 1 (Mixtral
always; Qwen-MoE / OLMoE when `norm_topk_prob` is true) give the single remaining expert the
full weight at top-1; the others scale it by its router probability. `renormalize: true/false`
sets `norm_topk_prob` where the family has that switch (a Mixtral cannot stop renormalising:
asking so is a one-line error); default: keep the family's rule. Renormalising keeps the layer's
output scale, which matters more the fewer experts remain (Qwen's and OLMoE's routers spread
probability over many experts, so top-1 without renormalisation shrinks the MoE output).

When to use: a faster MoE (fewer expert FLOPs per token, measured by kompakt eval's speed);
quality drops as the router's second choices carried real weight. Heal with distill.kd.

Sample recipe step::

    - moe.topk: {top_k: 1}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kompakt.errors import ConfigError
from kompakt.model.arch import decoder_layers, get_submodule, text_config
from kompakt.model.moe import moe_spec, renormalizes, set_top_k, top_k
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc

logger = logging.getLogger(__name__)


@dataclass
class MoETopKConfig:
    top_k: int = field(default=1, metadata=doc("experts per token after the step (at least 1)"))
    renormalize: bool | None = field(
        default=None, metadata=doc("renormalise the chosen experts' weights to sum 1 (default: as the family does)")
    )

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"moe.topk: top_k must be at least 1, got {self.top_k}")


def set_renormalize(loaded, value: bool) -> None:
    """Set the family's top-k renormalisation switch (config and the routers' cached flag)."""
    rule = moe_spec(loaded).renormalize
    if isinstance(rule, bool):
        if rule != value:
            family = text_config(loaded).model_type
            raise ConfigError(f"moe.topk: {family} always {'renormalises' if rule else 'keeps'} top-k weights; "
                              f"drop renormalize or set it to {str(rule).lower()}")  # fmt: skip
        return
    setattr(text_config(loaded), rule, value)
    block = moe_spec(loaded).block
    for layer in decoder_layers(loaded):
        for module in get_submodule(layer, block).modules():
            if isinstance(module.__dict__.get(rule), bool):
                setattr(module, rule, value)


def apply(ctx: PassContext, config: MoETopKConfig) -> PassReport:
    loaded = ctx.loaded
    before, renorm_before = top_k(loaded), renormalizes(loaded)
    if config.top_k >= before and config.renormalize in (None, renorm_before):
        raise ConfigError(f"moe.topk: the model already routes to {before} experts per token; give top_k below {before}")
    if config.renormalize is not None:
        set_renormalize(loaded, config.renormalize)
    changes = set_top_k(loaded, config.top_k)  # checks 1 <= k <= experts
    renorm = renormalizes(loaded)
    summary = f"top-k {before} -> {config.top_k} experts per token ({'renormalised' if renorm else 'not renormalised'})"
    logger.info("moe.topk: %s", summary)
    details = {**changes, "renormalized": [renorm_before, renorm]}
    return PassReport(loaded=loaded, summary=summary, details=details)


PASS = PassSpec(
    name="moe.topk",
    config=MoETopKConfig,
    apply=apply,
    changes_architecture=True,
    decoder_only="it changes the routing of Mixture-of-Experts decoders; sentence encoders have none",
    moe_only="it edits experts and routers",
    doc=__doc__ or "",
)
