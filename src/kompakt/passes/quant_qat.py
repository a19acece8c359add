"""Quantization-aware training (QAT): train on fake-quantized weights, then freeze them to the grid.

The model learns to live on the grid, then is frozen back to the integer format quant.rtn
stores and exports.

Forward passes use round-to-nearest of the latent fp32 weights on the grid (scales follow the
latent weights, as RTN fits them); the straight-through estimator (Bengio et al. 2013) passes
the gradient of the quantized weight to the latent one unchanged. The loss is the KD loss
against the teacher (default the recipe's original), as in LLM-QAT (Liu et al. 2023), which
also showed that teacher-generated text — kompakt's default data — works without any corpus.
After training, the latent weights are quantized once more with the same grid (bit-identical to
the last forward) and the model carries the same storage / export contract as quant.rtn
(the grid in the compression state, kompakt.model.compression; packed layers in the report).

Grid: on a model a previous step quantized (quant.rtn / gptq / awq, in memory or reloaded from
a compressed-tensors step directory), QAT trains on *that* grid and those modules (its own grid
fields are then ignored); on an unquantized model it uses its own fields, exactly as quant.rtn
reads them (`bits`, `group_size`, `symmetric`, `format`, `tensor_types`, `modules`); a previous
step's per-tensor types are kept (each weight trains on its own type's grid).

When to use it: when post-training quantization loses too much (4 bits and below on small
models); after quant.rtn or quant.gptq it starts from their codes. Costs like distill.kd, plus
one fake-quantization of every quantized weight per forward.

Sample recipe steps::

    - quant.rtn: {bits: 4, group_size: 64}
    - quant.qat: {tokens: 65536, lr: 1.0e-4}
    - quant.qat: {bits: 4, group_size: 32, tokens: 32768, alpha: 1.0}   # on an unquantized model
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from kompakt.errors import ConfigError
from kompakt.model.compression import clear_quantization, compressed_tensors_config, get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.moe import is_expert_role
from kompakt.model.quantized import is_quantized
from kompakt.passes.base import PassContext, PassReport, PassSpec
from kompakt.passes.distill_kd import objective_for
from kompakt.passes.quant_common import (
    GridPlan,
    QuantGridConfig,
    Target,
    grid_counts,
    notes_of,
    plan_grid,
    record,
    rtn_targets,
    rtn_weight,
    select_targets,
    target_types,
)
from kompakt.passes.train_common import KDFields, TrainingConfig, prepare, run

logger = logging.getLogger(__name__)

NAME = "quant.qat"


@dataclass
class QatConfig(QuantGridConfig, TrainingConfig, KDFields):
    # SmolLM2 4-bit g64, 8k-16k KD tokens: 2e-5 recovered 28 % of the RTN gap, 1e-4 to 1.5e-4 about half.
    lr: float = field(default=1e-4, metadata={"doc": "peak AdamW learning rate"})

    def validate(self) -> None:
        self.validate_grid(NAME)
        self.validate_training(NAME)
        self.validate_kd(NAME)


class FakeQuant(nn.Module):
    """weight -> RTN(weight) on the grid in the forward, identity in the backward (STE)."""

    def __init__(self, config: QuantGridConfig, plan: GridPlan) -> None:
        super().__init__()
        self.config, self.plan = config, plan

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = rtn_weight(weight, self.config, self.plan)[0]
        return weight + (quantized.to(weight.dtype) - weight).detach()


def grid_of(model: nn.Module) -> tuple[QuantGridConfig, list[str]] | None:
    """The grid and modules a previous quant step left on `model` (None when unquantized)."""
    quantization = get_state(model).quantization
    if quantization is not None and quantization.modules:
        return QuantGridConfig.of(quantization, dict(get_state(model).per_tensor_types)), list(quantization.modules)
    data = compressed_tensors_config(model)
    if data is None:
        return None
    groups = list((data.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ConfigError(f"{NAME}: the model mixes {len(groups)} quantization grids; QAT trains one grid — "
                          "start from a model quantized with one quant step")  # fmt: skip
    weights = groups[0].get("weights") or {}
    config = QuantGridConfig(bits=int(weights["num_bits"]), group_size=weights.get("group_size"),
                             symmetric=bool(weights.get("symmetric", True)))  # fmt: skip
    return config, [t for t in groups[0].get("targets", []) if not t.startswith("re:")]


def _targets(loaded: LoadedModel, config: QatConfig) -> tuple[QuantGridConfig, list[Target], str]:
    """(grid config, targets, where the grid came from)."""
    previous = grid_of(loaded.model)
    if previous is None:
        return config, select_targets(loaded.model, config, NAME), "own config"
    grid, modules = previous
    wanted = set(modules)
    everything = QuantGridConfig(embeddings=True, lm_head=True)
    targets = [t for t in select_targets(loaded.model, everything, NAME) if t.name in wanted]
    missing = wanted - {t.name for t in targets}
    if missing:
        raise ConfigError(f"{NAME}: quantized module(s) {', '.join(sorted(missing)[:3])} not found in the model")
    grid.embeddings = any(t.role == "embed" for t in targets)
    grid.lm_head = any(t.role == "lm_head" for t in targets)
    return grid, targets, "previous quant step"


def _attach(targets: list[Target], grid: QuantGridConfig, types: dict[str, str]) -> dict[str, GridPlan]:
    plans: dict[str, GridPlan] = {}
    for target in targets:
        plan = plan_grid(grid, target.module.weight.shape[1], types.get(target.name))
        plans[target.name] = plan
        # An MoE's experts are views into fused parameters the forward reads directly: a parametrization
        # of the view would not be seen, so they train unquantized and are rounded (RTN) at the end.
        if plan.grid is not None and not is_expert_role(target.role):
            parametrize.register_parametrization(target.module, "weight", FakeQuant(grid, plan), unsafe=True)
    return plans


def _detach(targets: list[Target]) -> None:
    """Back to plain weights holding the latent (trained) values."""
    for target in targets:
        if parametrize.is_parametrized(target.module, "weight"):
            parametrize.remove_parametrizations(target.module, "weight", leave_parametrized=False)


def apply(ctx: PassContext, config: QatConfig) -> PassReport:
    loaded = ctx.loaded
    grid, targets, source = _targets(loaded, config)
    types = target_types(loaded.model, grid, targets, NAME)
    if source != "own config" and (config.format or config.bits != 4 or config.modules):
        logger.warning("%s: the model is already on %s; QAT keeps that grid (its own grid fields are ignored)",
                       NAME, grid.grid_label)  # fmt: skip
    prepared = prepare(ctx, config, NAME)
    if is_quantized(loaded):
        clear_quantization(loaded)  # re-recorded when the weights are frozen to the grid
    loaded.storage_dtype = torch.float32  # the frozen values are exact in fp32 (as quant.rtn)
    objective = objective_for(config, prepared.teacher.model, loaded.model)
    _attach(targets, grid, types)
    try:
        result = run(ctx, config, NAME, loaded.model, objective, prepared)
    finally:
        _detach(targets)
    quantized = rtn_targets(targets, grid, types)
    packed_layers = record(loaded, "qat", grid, quantized, types)
    done = quantized.plans
    notes = notes_of(done, NAME)
    if any(is_expert_role(t.role) for t in targets):
        notes.append("MoE experts (fused parameters) trained unquantized and rounded to the grid at the end (RTN)")
    history = result.history
    summary = (f"qat {grid.grid_label} ({source}): {result.tokens} tokens, {result.steps} steps, "
               f"{result.tokens_per_s:.0f} tok/s; loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}"
               if history else f"qat {grid.grid_label}: nothing left to train")  # fmt: skip
    details: dict[str, Any] = {**result.summary(), "grid": grid.grid_label, "grid_source": source,
                               "modules": len(done), "grids": grid_counts(grid, done), "notes": notes,
                               "data": prepared.data.source}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary, details=details, packed_layers=packed_layers)


PASS = PassSpec(name=NAME, config=QatConfig, apply=apply, needs_teacher=True, needs_training=True,
                decoder_only="it trains against the teacher's next-token distributions, which an encoder "
                "does not produce; use quant.gptq", doc=__doc__ or "")  # fmt: skip
