"""Unstructured and N:M sparsity: magnitude, Wanda and SparseGPT, optionally OWL and gradual.

Methods (the math lives in `kompakt.ops`):
- `magnitude` — drop the smallest |w| of each matrix (Han et al. 2015). No data needed; the
  baseline, and weak on LLMs.
- `wanda` — score |W_ij| · ‖X_j‖₂, prune per output row, no weight update (Sun, Liu, Bair,
  Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models").
- `sparsegpt` — OBS saliency w² / [H⁻¹]_jj² with the OBS update of the remaining weights
  (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot"). Best quality; one Hessian inverse per Linear.

Wanda and SparseGPT run layer by layer through `kompakt.calib.run_sequential`: each layer
sees the calibration activations produced by the already-pruned layers before it, and within
a layer the Linears are pruned in data-flow order ({q,k,v}, o, {gate,up}, down; set
`true_sequential: false` to prune a layer's Linears together from its inputs). An MoE's
experts ("mlp.experts.<e>.<gate|up|down>", selected by "mlp" too) are pruned on the tokens
routed to each (kompakt.calib.experts; a starved expert on all tokens, named in the notes).

Targets: `sparsity` (fraction of weights removed from each pruned Linear, in [0, 1); default
0.5) or `nm: "2:4"` / `"4:8"` (keep N of every M consecutive input weights; M must divide
every pruned Linear's input width). Default modules: every Linear of every decoder layer;
embeddings and lm_head are never pruned. `modules` picks roles ("attn", "mlp", "attn.o",
"mlp.down", ...).

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): `owl: true` gives layers with
many outliers — the fraction of |W|·‖X‖ scores above `owl_m` × their mean, measured on the
dense model — a lower sparsity: s_l = s − λ·(r̂_l − mean r̂), r̂ the ratios scaled to
[0, 2λ] (λ = `owl_lambda`), so the mean over layers stays s. Helps most at high sparsity.

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune"): a recipe writes the pass
`steps` times with `step: 1..steps`; step k prunes to s_k = s + (s_0 − s)(1 − k/steps)³
(s_0 = `initial_sparsity`, s = `sparsity`), so the last step reaches the target. Put
healing (distillation) steps between them. Already-zero weights score lowest and are pruned
again by magnitude and Wanda (SparseGPT's update may revive a few).

The pruned weights are set to exact zeros: the model stays dense on disk (same shapes and
bytes); sparse storage and kernels come later. Use it for quality studies, as a start for
2:4 hardware acceleration, or with a later quantization step.

Sample recipe steps::

    - prune.sparse: {method: sparsegpt, sparsity: 0.5}
    - prune.sparse: {method: wanda, nm: "2:4"}
    - prune.sparse: {method: wanda, sparsity: 0.7, owl: true}
    - prune.sparse: {method: sparsegpt, sparsity: 0.6, steps: 3, step: 1}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kompakt.calib import LayerStats, run_sequential
from kompakt.calib.threads import solver_threads
from kompakt.errors import ConfigError
from kompakt.model.arch import ArchSpec, arch_for, decoder_layers
from kompakt.model.moe import all_linears, all_roles, linear_name
from kompakt.ops.sparsegpt import sparsegpt_prune
from kompakt.ops.sparsity_masks import magnitude_prune
from kompakt.ops.wanda import wanda_prune, wanda_scores
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.passes.streaming import each_layer, layer_writer

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")
MODULE_NAMES = ("attn", "mlp", *ROLES)
DEFAULT_SPARSITY = 0.5
MAX_LAYER_SPARSITY = 0.99  # OWL never prunes a layer completely


@dataclass
class SparseConfig:
    method: str = field(default="sparsegpt", metadata=doc(f"pruning criterion: {', '.join(METHODS)}"))
    sparsity: float | None = field(
        default=None, metadata=doc("fraction of weights removed per Linear, in [0, 1) (default 0.5 without nm)")
    )
    nm: str | None = field(default=None, metadata=doc('N:M pattern "2:4" or "4:8": keep N of every M inputs'))
    modules: list[str] | str | None = field(
        default=None, metadata=doc("Linear roles to prune: attn, mlp, attn.q, ..., mlp.down (default all)")
    )
    owl: bool = field(default=False, metadata=doc("non-uniform layer sparsity from outlier ratios (OWL)"))
    owl_m: float = field(default=5.0, metadata=doc("OWL: an outlier score exceeds owl_m x the layer mean"))
    owl_lambda: float = field(default=0.08, metadata=doc("OWL: layer sparsities span target +- owl_lambda"))
    steps: int = field(default=1, metadata=doc("gradual pruning: number of steps in the cubic schedule"))
    step: int = field(default=1, metadata=doc("gradual pruning: this step's number, 1..steps"))
    initial_sparsity: float = field(default=0.0, metadata=doc("gradual pruning: sparsity before step 1"))
    true_sequential: bool = field(default=True, metadata=doc("prune q/k/v, o, gate/up, down one after another"))
    block_size: int = field(default=128, metadata=doc("SparseGPT: columns per lazy-update block"))
    percdamp: float = field(default=0.01, metadata=doc("SparseGPT: Hessian damping, fraction of mean diagonal"))
    max_blocks: int | None = field(default=None, metadata=doc("use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("calibration blocks per layer call"))

    def uses_calibration(self) -> bool:
        """method: magnitude without owl reads only the weights."""
        return self.method != "magnitude" or self.owl

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"prune.sparse: unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"prune.sparse: sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")
        if self.nm is not None:
            parse_nm(self.nm)
            if self.sparsity is not None:
                raise ConfigError("prune.sparse: give either sparsity or nm, not both")
            if self.owl or self.steps != 1:
                raise ConfigError("prune.sparse: nm is a fixed pattern; drop owl / steps or use sparsity")
        module_names(self.modules)
        if self.steps < 1 or not 1 <= self.step <= self.steps:
            raise ConfigError(f"prune.sparse: need 1 <= step <= steps, got step {self.step} of {self.steps}")
        if not 0.0 <= self.initial_sparsity <= self.target:
            raise ConfigError(f"prune.sparse: initial_sparsity must be in [0, sparsity], got {self.initial_sparsity}")
        if self.owl and (self.owl_m <= 0 or not 0 <= self.owl_lambda < 0.5):
            raise ConfigError("prune.sparse: owl_m must be > 0 and owl_lambda in [0, 0.5)")
        if self.block_size < 1 or self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError("prune.sparse: block_size, batch_size and max_blocks must be at least 1")
        if self.percdamp < 0:
            raise ConfigError(f"prune.sparse: percdamp must be >= 0, got {self.percdamp}")

    @property
    def target(self) -> float:
        """The final unstructured sparsity (1 − N/M for an N:M pattern)."""
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            return 1.0 - n / m
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity


def parse_nm(text: str) -> tuple[int, int]:
    """ "2:4" -> (2, 4); ConfigError unless it reads N:M with 0 < N < M."""
    parts = str(text).replace(" ", "").split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f'prune.sparse: nm must look like "2:4" (keep N of every M), got {text!r}') from None
    if not 0 < n < m:
        raise ConfigError(f"prune.sparse: nm needs 0 < N < M (keep N of every M), got {text!r}")
    return n, m


def module_names(modules: list[str] | str | None) -> list[str]:
    """The `modules` field as a list of names (a string may be comma-separated); checked."""
    if modules is None:
        return []
    names = [n.strip() for n in modules.split(",")] if isinstance(modules, str) else [str(n) for n in modules]
    unknown = [n for n in names if n not in MODULE_NAMES]
    if unknown or not names:
        raise ConfigError(f"prune.sparse: unknown module {unknown[0] if unknown else ''!r}; valid: {', '.join(MODULE_NAMES)}")
    return names


def selected_roles(config: SparseConfig, spec: ArchSpec, model: nn.Module | None = None) -> list[str]:
    """The roles of this family's Linears that `modules` selects (all by default; an MoE's experts
    are "mlp.experts.<e>.<part>", selected by "mlp" too)."""
    available = all_roles(model) if model is not None else list(spec.linear_paths)
    names = module_names(config.modules)
    if not names:
        return available
    roles = [r for r in available if any(r == n or r.startswith(n + ".") for n in names)]
    if not roles:
        raise ConfigError(
            f"prune.sparse: modules {names} match no Linear of a {spec.family} layer; it has {', '.join(available)}"
        )
    return roles


def scheduled_sparsity(config: SparseConfig) -> float:
    """Zhu & Gupta's cubic schedule: s_k = s + (s_0 − s)(1 − k/steps)³ (= s at the last step)."""
    final = config.target
    return final + (config.initial_sparsity - final) * (1.0 - config.step / config.steps) ** 3


def check_nm(model: nn.Module, spec: ArchSpec, roles: list[str], nm: tuple[int, int]) -> None:
    """ConfigError naming the first pruned Linear whose input width M does not divide."""
    for index, layer in enumerate(decoder_layers(model)):
        for role, module in all_linears(layer, spec).items():
            if role in roles and module.in_features % nm[1]:
                path = linear_name(spec, index, role)
                raise ConfigError(
                    f"prune.sparse: N:M {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}, but {path} has"
                    f" {module.in_features}; use unstructured sparsity or exclude it with modules"
                )


# --------------------------------------------------------------------------- OWL


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all scores of a layer that exceed m × their mean (OWL's layer outlier ratio)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsity: target − (r̂ − mean r̂), r̂ = ratios min-max scaled to [0, 2λ] (OWL code)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0.0:
        return [target] * len(ratios)
    scaled = (r - r.min()) / span * (2 * lam)
    return [min(max(target - float(v), 0.0), MAX_LAYER_SPARSITY) for v in scaled - scaled.mean()]


def layer_outlier_ratios(model: nn.Module, blocks: torch.Tensor, roles: list[str], config: SparseConfig) -> list[float]:
    """OWL ratios of every decoder layer from the dense model's Wanda scores (nothing is changed)."""
    ratios: dict[int, float] = {}

    def measure(index: int, layer: nn.Module, stats: LayerStats) -> None:
        scores = [wanda_scores(s.module.weight, s.column_norms()) for s in stats.values()]
        ratios[index] = outlier_ratio(scores, config.owl_m)

    run_sequential(
        model, blocks, measure, roles=roles, collect="norms", true_sequential=False,
        batch_size=config.batch_size, description="OWL outlier ratios",
    )  # fmt: skip
    return [ratios.get(i, 0.0) for i in range(len(decoder_layers(model)))]


# --------------------------------------------------------------------------- pruning


def _prune_linear(module: nn.Linear, config: SparseConfig, sparsity: float | None, nm, stat=None,
                  take: bool = False) -> dict[str, Any]:  # fmt: skip
    """Prune one Linear in place with the configured method; returns what was done. `take`: the
    last Linear reading `stat`'s Hessian accumulator: SparseGPT takes it over (no copy)."""
    weight = module.weight
    if config.method == "magnitude":
        result = magnitude_prune(weight.data, sparsity=sparsity, nm=nm)
        new, loss = result.weight, None
    elif config.method == "wanda":
        result = wanda_prune(weight.data, stat.column_norms(), sparsity=sparsity, nm=nm)
        new, loss = result.weight, None
    else:
        with solver_threads(weight.device):
            result = sparsegpt_prune(
                weight.data, stat.hessian_acc if take and stat.hessian_acc is not None else stat.hessian(),
                sparsity=sparsity, nm=nm,
                block_size=config.block_size, percdamp=config.percdamp,
            )  # fmt: skip
        new, loss = result.weight, result.loss
    weight.data.copy_(new.to(weight.dtype))
    zeros = int((weight.data == 0).sum())
    return {"zeros": zeros, "numel": weight.numel(), **({"loss": loss} if loss is not None else {})}




def _prune_calibrated(
    ctx: PassContext, blocks: torch.Tensor, roles: list[str], config: SparseConfig, layer_sparsity: list[float], nm
) -> dict[str, dict[str, Any]]:
    """Wanda / SparseGPT through the sequential driver; returns per-Linear results by path."""
    model = ctx.loaded.model
    spec = arch_for(model)
    done: dict[str, dict[str, Any]] = {}

    def process(index: int, layer: nn.Module, stats: LayerStats) -> None:
        sparsity = None if nm is not None else layer_sparsity[index]
        last = {id(stat.hessian_acc): role for role, stat in stats.items()}  # the last reader of each accumulator
        for role, stat in stats.items():
            take = last[id(stat.hessian_acc)] == role
            done[linear_name(spec, index, role)] = _prune_linear(stat.module, config, sparsity, nm, stat, take)

    result = run_sequential(
        model, blocks, process, roles=roles, collect="hessian" if config.method == "sparsegpt" else "norms",
        true_sequential=config.true_sequential, batch_size=config.batch_size,
        description=f"{config.method} pruning", on_layer=layer_writer(ctx),
    )  # fmt: skip
    return done, result.notes


def _prune_magnitude(ctx: PassContext, roles: list[str], config: SparseConfig, layer_sparsity: list[float], nm):
    spec = arch_for(ctx.loaded.model)
    done: dict[str, dict[str, Any]] = {}

    @torch.no_grad()
    def prune_layer(index: int, layer: nn.Module) -> None:
        for role, module in all_linears(layer, spec).items():
            if role in roles:
                sparsity = None if nm is not None else layer_sparsity[index]
                done[linear_name(spec, index, role)] = _prune_linear(module, config, sparsity, nm)

    each_layer(ctx, prune_layer)  # streamed: each layer read, pruned, written and released in turn
    return done


def apply(ctx: PassContext, config: SparseConfig) -> PassReport:
    start = time.perf_counter()
    model = ctx.loaded.model
    spec = arch_for(model)
    roles = selected_roles(config, spec, model)
    nm = parse_nm(config.nm) if config.nm is not None else None
    if nm is not None:
        check_nm(model, spec, roles, nm)
    n_layers = len(decoder_layers(model))
    target = config.target if nm is not None else scheduled_sparsity(config)
    layer_sparsity = [target] * n_layers
    blocks = ctx.calibration()[: config.max_blocks] if config.uses_calibration() else None
    ratios = None
    if config.owl:
        ratios = layer_outlier_ratios(model, blocks, roles, config)
        layer_sparsity = owl_sparsities(ratios, target, config.owl_lambda)
    notes: list[str] = []  # routing-aware calibration: experts calibrated on all tokens, and why
    if config.method == "magnitude":
        done = _prune_magnitude(ctx, roles, config, layer_sparsity, nm)
    else:
        done, notes = _prune_calibrated(ctx, blocks, roles, config, layer_sparsity, nm)
    zeros = sum(d["zeros"] for d in done.values())
    numel = sum(d["numel"] for d in done.values())
    pattern = f"{nm[0]}:{nm[1]}" if nm else f"{target:.1%} unstructured"
    summary = (
        f"{config.method} {pattern}{' (OWL)' if config.owl else ''}: {zeros / max(numel, 1):.1%} of the weights"
        f" of {len(done)} Linears are zero ({zeros:,} of {numel:,})"
    ) + "".join(f"; {note}" for note in notes)
    details = {
        "method": config.method, "pattern": pattern, "target_sparsity": target,
        "achieved_sparsity": zeros / max(numel, 1), "zeros": zeros, "pruned_weights_total": numel,
        "layer_sparsity": layer_sparsity, "owl_outlier_ratios": ratios, "linears": done,
        "calibration_blocks": None if blocks is None else list(blocks.shape),
        "seconds": time.perf_counter() - start, "storage": "dense (zeros stored)", "notes": notes,
    }  # fmt: skip
    logger.info("%s", summary)
    return PassReport(loaded=ctx.loaded, summary=summary, details=details)


PASS = PassSpec(
    name="prune.sparse",
    config=SparseConfig,
    apply=apply,
    needs_calibration=True,
    streams=True,
    doc=__doc__ or "",
)
