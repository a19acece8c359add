"""lowrank.svd: replace decoder Linears by two thin ones (truncated SVD), at a global parameter budget.

Each chosen weight W [out, in] becomes B [out, r] · A [r, in] (kompakt.model.lowrank, two
ordinary Linears), by one of (math in kompakt.ops.svd):

- ``plain``: truncated SVD of W. No data; blind to which inputs matter (the SVD-LLM paper's
  plain-SVD LLaMA-7B at 20 % has perplexity 20061).
- ``asvd``: ASVD (Yuan et al. 2023, arXiv:2312.05821): input columns scaled by the mean
  activation magnitude |x|^α (α = 0.5, the paper's) before the SVD, unscaled after; statistics
  from the unchanged model, as the reference code (hahnyuan/ASVD4LLM).
- ``svd-llm`` (default): SVD-LLM (Wang et al. 2024, arXiv:2403.07378): truncation-aware data
  whitening with the Cholesky factor of the calibration Gram XᵀX, so the discarded singular
  values are exactly the layer's output error; a Gram that is not positive definite is
  regularised (−λ_min + ε)·I and the report names the matrix. SVD-LLM's closed-form update of
  the factors from the inputs of the already-compressed layers runs on the sequential driver
  (kompakt.calib, as GPTQ): layer by layer, and within a layer {q,k,v}, o, {gate,up}, down in
  data-flow order, each matrix is factorized on the Gram X̃ᵀX̃ of the inputs the compressed
  model now produces. The reference (AIoT-MLSys-Lab/SVD-LLM `whitening_local_update`) whitens
  with the original model's Gram and then refits U by least squares to min ‖W X̃ − U·(V X̃)‖;
  whitening with X̃'s own Gram solves that same objective for both factors jointly in closed
  form (the refit of U is then a no-op), so it is never worse on it.

Budget: `target_params` is the fraction of all decoder Linear parameters removed (embeddings and
lm_head excluded; matrices outside `targets` count as kept). Ranks are allocated globally from
the truncation loss (kompakt.ops.rank_alloc): every matrix starts at rank 8, and rank goes, 8 at a
time, where the discarded share of the (scaled / whitened) singular-value energy falls most per
parameter. Ranks are multiples of 8 and always below the break-even rank out·in/(out+in); a
matrix that would need more stays dense, and the report names it and why. For plain and asvd the
ranks come from the unchanged weights; for svd-llm from the original model's whitened spectra.

When to use: to remove parameters without training, before quantization (GPTQ then quantizes the
factors) and before healing with distill.kd. Speed: a factorized Linear does two matmuls; it is
faster only well below break-even. GGUF / HF export needs `--merge` (back to dense size).

Sample recipe steps::

    - lowrank.svd: {method: svd-llm, target_params: 0.2}
    - lowrank.svd: {method: asvd, target_params: 0.3, targets: ["*.mlp.*"]}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from kompakt.calib import LayerStats, run_sequential
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, linear_modules, linear_path
from kompakt.model.compression import get_state
from kompakt.model.lowrank import factorize_linear
from kompakt.model.quantized import is_quantized
from kompakt.ops import svd
from kompakt.ops.rank_alloc import Spectrum, allocate_ranks, parameters
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc

logger = logging.getLogger(__name__)

METHODS = ("plain", "asvd", "svd-llm")
RANK_MULTIPLE = 8
NAMES_SHOWN = 3


@dataclass
class LowRankConfig:
    method: str = field(default="svd-llm", metadata=doc("plain, asvd or svd-llm"))
    target_params: float = field(default=0.2, metadata=doc("fraction of decoder Linear parameters removed, in (0, 1)"))
    targets: list[str] | str | None = field(
        default=None, metadata=doc("module-name patterns (fnmatch) to factorize, e.g. '*.mlp.*' (default all)")
    )
    alpha: float = field(default=svd.ASVD_ALPHA, metadata=doc("asvd: exponent on the activation magnitude"))
    true_sequential: bool = field(default=True, metadata=doc("svd-llm: q/k/v, o, gate/up, down one after another"))
    max_blocks: int | None = field(default=None, metadata=doc("use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("calibration blocks per layer call"))

    def uses_calibration(self) -> bool:
        """method: plain truncates the weights themselves; asvd and svd-llm use calibration inputs."""
        return self.method != "plain"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"lowrank.svd: method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.target_params < 1.0:
            raise ConfigError(f"lowrank.svd: target_params must be in (0, 1), e.g. 0.2; got {self.target_params}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) for t in self.targets)):
            raise ConfigError("lowrank.svd: targets must be a list of module-name patterns, e.g. ['*.mlp.*']")
        if self.alpha <= 0 or self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError("lowrank.svd: alpha must be > 0, batch_size and max_blocks at least 1")


@dataclass
class Matrix:
    """One decoder Linear the pass may factorize."""

    name: str
    layer: int
    role: str
    module: nn.Linear
    spectrum: Spectrum | None = None
    mean_abs: torch.Tensor | None = None  # asvd's statistics
    rank: int | None = None
    regularised: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.module.out_features, self.module.in_features


def _all_linears(model: nn.Module) -> list[Matrix]:
    spec = arch_for(model)
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        for role, module in linear_modules(layer, spec).items():
            found.append(Matrix(f"{spec.layers}.{index}.{linear_path(spec, role)}", index, role, module))
    return found


def _check_model(ctx: PassContext) -> None:
    if get_state(ctx.loaded).lowrank:
        raise ConfigError("lowrank.svd: this model is already factorized; run lowrank.svd once, on the dense model")
    if is_quantized(ctx.loaded):
        raise ConfigError("lowrank.svd: the weights are quantized; factorize first, then quantize the factors")


def _select(linears: list[Matrix], targets: list[str] | None) -> list[Matrix]:
    if targets is None:
        return linears
    chosen = [m for m in linears if any(fnmatchcase(m.name, p) for p in targets)]
    if not chosen:
        example = linears[0].name if linears else "model.layers.0.mlp.up_proj"
        raise ConfigError(f"lowrank.svd: targets {targets} match no decoder Linear (names look like {example})")
    return chosen


def _transform(matrix: Matrix, method: str, alpha: float, gram: torch.Tensor | None) -> svd.Transform:
    if method == "plain":
        return svd.identity()
    if method == "asvd":
        return svd.activation_scaling(matrix.mean_abs, alpha)  # type: ignore[arg-type]
    return svd.whitening(gram)  # type: ignore[arg-type]


def _calibrate(ctx: PassContext, config: LowRankConfig, chosen: list[Matrix],
               on_group: Any, *, collect: str, true_sequential: bool) -> tuple[int, int]:  # fmt: skip
    """Run the sequential driver over the chosen matrices; `on_group(matrix, stats)` per matrix."""
    model = ctx.loaded.model
    by_key = {(m.layer, m.role): m for m in chosen}
    roles = sorted({m.role for m in chosen})  # Linears reading one tensor share its Gram (the driver aliases them)
    blocks = ctx.calibration()[: config.max_blocks]

    def process(index: int, layer: nn.Module, stats: LayerStats) -> None:
        for role, stat in stats.items():
            for matrix in (m for (i, r), m in by_key.items() if i == index and r == role):
                on_group(matrix, stat)

    run_sequential(model, blocks, process, roles=roles, collect=collect, true_sequential=true_sequential,
                   batch_size=config.batch_size, description=f"lowrank.svd ({config.method})",
                   only_layers={m.layer for m in chosen})  # fmt: skip
    return int(blocks.shape[0]), int(blocks.shape[1])


def _spectra(ctx: PassContext, config: LowRankConfig, chosen: list[Matrix]) -> tuple[int, int] | None:
    """Fill each matrix's spectrum (and asvd's statistics) from the unchanged model."""
    if not config.uses_calibration():  # plain
        for m in chosen:
            m.spectrum = Spectrum(*m.shape, svd.singular_values(m.module.weight, svd.identity()))
        return None

    def on_group(matrix: Matrix, stat) -> None:
        if config.method == "asvd":
            matrix.mean_abs = stat.mean_abs().cpu()
            transform = _transform(matrix, "asvd", config.alpha, None)
        else:
            transform = svd.whitening(stat.hessian())
        matrix.spectrum = Spectrum(*matrix.shape, svd.singular_values(matrix.module.weight, transform).cpu())

    collect = "norms" if config.method == "asvd" else "hessian"
    return _calibrate(ctx, config, chosen, on_group, collect=collect, true_sequential=False)


def _allocate(config: LowRankConfig, linears: list[Matrix], chosen: list[Matrix]) -> int:
    """Set each chosen matrix's rank (None = dense); returns the decoder Linear parameters before."""
    total = sum(m.module.weight.numel() for m in linears)
    fixed = total - sum(m.module.weight.numel() for m in chosen)
    budget = int((1.0 - config.target_params) * total) - fixed
    try:
        ranks = allocate_ranks([m.spectrum for m in chosen], budget, RANK_MULTIPLE)  # type: ignore[misc]
    except ValueError as exc:
        raise ConfigError(f"lowrank.svd: target_params {config.target_params} cannot be met without exceeding "
                          f"dense ({exc}); lower target_params or widen targets") from None  # fmt: skip
    for matrix, rank in zip(chosen, ranks):
        matrix.rank = rank
    return total


def _factorize(matrix: Matrix, model: nn.Module, method: str, transform: svd.Transform) -> float:
    """Swap the matrix for its factors; returns the discarded share of its (transformed) energy."""
    factors = svd.factorize(matrix.module.weight, matrix.rank, transform)  # type: ignore[arg-type]
    matrix.regularised = transform.regularised
    if transform.regularised:
        logger.warning("%s: Gram not positive definite; regularised by %.3g", matrix.name, transform.regularised)
    factorize_linear(model, matrix.name, up=factors.up, down=factors.down, method=method)
    return factors.loss


def _apply_all(ctx: PassContext, config: LowRankConfig, chosen: list[Matrix]) -> dict[str, float]:
    model = ctx.loaded.model
    todo = [m for m in chosen if m.rank is not None]
    if config.method != "svd-llm":
        return {m.name: _factorize(m, model, config.method, _transform(m, config.method, config.alpha, None)) for m in todo}
    losses: dict[str, float] = {}

    def on_group(matrix: Matrix, stat) -> None:
        losses[matrix.name] = _factorize(matrix, model, "svd-llm", svd.whitening(stat.hessian()))

    _calibrate(ctx, config, todo, on_group, collect="hessian", true_sequential=config.true_sequential)
    return losses


def _dense_reasons(chosen: list[Matrix]) -> dict[str, str]:
    reasons = {}
    for m in chosen:
        if m.rank is None:
            limit = svd.break_even_rank(*m.shape)
            if svd.max_rank(*m.shape, RANK_MULTIPLE) < RANK_MULTIPLE:
                reasons[m.name] = f"its break-even rank {limit:.1f} is below rank {RANK_MULTIPLE}"
            else:
                reasons[m.name] = f"the rank it earned reached its break-even rank {limit:.1f}, where dense is smaller"
    return reasons


def apply(ctx: PassContext, config: LowRankConfig) -> PassReport:
    start = time.perf_counter()
    _check_model(ctx)
    model = ctx.loaded.model
    linears = _all_linears(model)
    chosen = _select(linears, config.targets)
    calibration = _spectra(ctx, config, chosen)
    before = _allocate(config, linears, chosen)
    losses = _apply_all(ctx, config, chosen)
    after = before - sum(m.module.weight.numel() for m in chosen) + parameters(
        [m.spectrum for m in chosen], [m.rank for m in chosen])  # type: ignore[misc]  # fmt: skip
    dense = _dense_reasons(chosen)
    ranks = sorted(m.rank for m in chosen if m.rank is not None)
    removed = 1.0 - after / before
    regularised = {m.name: m.regularised for m in chosen if m.regularised}
    details = {
        "method": config.method, "target_params": config.target_params, "removed_params": removed,
        "linear_params": [before, after], "factorized": len(ranks), "dense": len(dense),
        "dense_why": dict(list(dense.items())[:NAMES_SHOWN]), "ranks": _rank_summary(ranks),
        "mean_truncation_loss": sum(losses.values()) / max(len(losses), 1), "regularised": len(regularised),
        "regularised_names": sorted(regularised)[:NAMES_SHOWN],
        "calibration_blocks": list(calibration) if calibration else None, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    summary = (f"lowrank.svd {config.method}: {len(ranks)} Linears factorized (ranks {ranks[0] if ranks else '-'}.."
               f"{ranks[-1] if ranks else '-'}), {len(dense)} kept dense, {removed:.1%} of decoder Linear "
               f"parameters removed")  # fmt: skip
    if dense:
        summary += f" ({len(dense)} dense: {next(iter(dense.values()))}, e.g. {next(iter(dense))})"
    return PassReport(loaded=ctx.loaded, summary=summary, details=details)


def _rank_summary(ranks: list[int]) -> dict[str, int]:
    if not ranks:
        return {}
    return {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]}


PASS = PassSpec(name="lowrank.svd", config=LowRankConfig, apply=apply, needs_calibration=True,
                changes_architecture=True, doc=__doc__ or "")  # fmt: skip
