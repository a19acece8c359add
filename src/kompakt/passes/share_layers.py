"""Recursive layer sharing: K unique decoder blocks reused over the model's L depths (ALBERT-style).

Paper: Bae et al. 2024, "Relaxed Recursive Transformers: Effective Parameter Sharing with
Layer-wise LoRA" (ICLR 2025). A pretrained L-layer model becomes K = L / B unique blocks, each used
B times; the Linear weights of the depths that share a block become one tensor, which cuts about
(1 − K/L) of the decoder's Linear parameters. Every depth still runs (same compute as before,
plus the relaxation).

- `pattern: cycle` (the paper's CYCLE): depth d uses block d mod K — the K-block stack is looped
  B times. `repeat` (the paper's SEQUENCE): depth d uses block d // B — each block runs B times
  in a row.
- `init: regmean` (default): the block's weight and every depth's delta are fitted to what the
  depths compute on calibration text, not to the weights: the shared W minimises
  Σ_d ‖(W_d − W − B_d A_d) X_d‖² over the depths' calibration inputs X_d (RegMean, Jin et al.
  2023), each delta is the best rank-r one in the same norm (SVD-LLM's whitening), and the two
  are refitted in turn `rounds` times (kompakt.ops.activation_merge). It needs calibration data
  and holds the input Gram matrices of one group's depths at a time (with `cycle`, of the first K
  layers until the loop comes back: on a 7B model several GB).
- `init: average` (the paper's Average): a block's weight is the mean of the weights of the
  depths that use it. `init: keep` (the paper's Stepwise): block i keeps original layer
  round(i·(L−1)/(K−1)) — every B-th layer, first and last kept; with `repeat` that layer is one of
  the block's own depths. The paper recommends Stepwise for plain sharing and Average with the
  relaxation; both fit weights, not outputs. Measured on SmolLM2-135M (15 of 30, rank 16, KL to
  the original on held-out wiki.valid before any training): repeat + average 10.8, repeat +
  regmean 4.0 — as close as removing 14 layers by block influence (3.9); cycle + keep 20.5.
- `relax_rank` r > 0 (the "relaxed" model): every depth adds its own rank-r delta B·A to each
  shared Linear; with `average` / `keep` initialised from the truncated SVD of (its original
  weight − the shared one), B = U_r Σ_r, A = V_rᵀ, as the paper; at full rank the original model
  is recovered exactly.
  It costs r·(in + out) parameters per Linear per depth (SmolLM2-135M: 0.16 M per depth at r 16).

Norms and biases stay per depth (not shared): they are < 0.1 % of a layer, they let each depth
rescale the shared block's inputs (cheap specialisation), and with them a full-rank relaxation
is the original model exactly, whatever the init. The result is a standard transformers model
whose depths hold the same nn.Parameter objects (kompakt.model.sharing): training sees each
shared tensor once, the save stores it once, `kompakt.load` rebuilds the ties. GGUF / plain HF
export refuse it, or write the dense equivalent with `--merge` (full size again).

When to use it: a model that has to get much smaller in parameters and bytes at the same depth,
with a real healing budget afterwards (distill.kd; the paper uptrains on billions of tokens):
before healing the shared model is close to useless (see the numbers above). Every
depth still computes, so unlike prune.depth it does not get faster; per the paper, at the same
parameter count a healed relaxed recursive model beats a depth-pruned one. Apply it before
quantization and before per-layer width pruning (the layers of a group must have equal shapes).

Sample recipe step::

    - share.layers: {ratio: 0.5, pattern: repeat, init: regmean, relax_rank: 16}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.loaded import LoadedModel
from kompakt.model.quantized import is_quantized
from kompakt.model.surgery import linear
from kompakt.ops.activation_merge import GroupFit, merge_group
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc

logger = logging.getLogger(__name__)

NAME = "share.layers"
PATTERNS = ("cycle", "repeat")
INITS = ("regmean", "average", "keep")


@dataclass
class ShareLayersConfig:
    unique: int | None = field(default=None, metadata=doc("unique blocks to keep; must divide the layer count"))
    ratio: float | None = field(default=None, metadata=doc("unique blocks as a fraction of the layers, in (0, 1)"))
    pattern: str = field(default="cycle", metadata=doc(f"which depths share a block: {', '.join(PATTERNS)}"))
    init: str = field(default="regmean", metadata=doc(f"the shared weight: {', '.join(INITS)}"))
    relax_rank: int = field(default=16, metadata=doc("rank of each depth's own low-rank delta (0 = plain sharing)"))
    rounds: int = field(default=5, metadata=doc("regmean: refits of the shared weight and the deltas, in turn"))
    max_blocks: int | None = field(default=32, metadata=doc("regmean: use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("regmean: calibration blocks per layer call"))

    def uses_calibration(self) -> bool:
        """init: average and keep read only the weights; regmean fits to calibration inputs."""
        return self.init == "regmean"

    def validate(self) -> None:
        if (self.unique is None) == (self.ratio is None):
            raise ConfigError(f"{NAME}: give exactly one of unique or ratio")
        if self.unique is not None and self.unique < 1:
            raise ConfigError(f"{NAME}: unique must be at least 1, got {self.unique}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"{NAME}: ratio must be in (0, 1), got {self.ratio}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"{NAME}: unknown pattern {self.pattern!r}; valid patterns: {', '.join(PATTERNS)}")
        if self.init not in INITS:
            raise ConfigError(f"{NAME}: unknown init {self.init!r}; valid inits: {', '.join(INITS)}")
        if self.relax_rank < 0:
            raise ConfigError(f"{NAME}: relax_rank must be >= 0, got {self.relax_rank}")
        if self.rounds < 0 or self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError(f"{NAME}: rounds must be >= 0, batch_size and max_blocks at least 1")

    def unique_blocks(self, n_layers: int) -> int:
        """K for an L-layer model; ConfigError unless 1 <= K < L and K divides L."""
        k = self.unique if self.unique is not None else round(self.ratio * n_layers)  # type: ignore[operator]
        asked = f"unique {self.unique}" if self.unique is not None else f"ratio {self.ratio} ({k} blocks)"
        if not 1 <= k < n_layers:
            raise ConfigError(f"{NAME}: {asked} of {n_layers} layers shares nothing or is impossible; "
                              f"choose 1 to {n_layers - 1} unique blocks")  # fmt: skip
        if n_layers % k:
            divisors = [d for d in range(1, n_layers) if n_layers % d == 0]
            raise ConfigError(f"{NAME}: {asked} does not divide {n_layers} layers; choose one of "
                              f"{', '.join(map(str, divisors))}")  # fmt: skip
        return k


def groups_for(pattern: str, n_layers: int, k: int) -> list[list[int]]:
    """Depths of each unique block: cycle block i at i, i+K, ...; repeat block i at iB .. iB+B-1."""
    if pattern == "cycle":
        return [list(range(i, n_layers, k)) for i in range(k)]
    b = n_layers // k
    return [list(range(i * b, (i + 1) * b)) for i in range(k)]


def stepwise_sources(n_layers: int, k: int) -> list[int]:
    """The paper's Stepwise selection: K layers at regular intervals, first and last kept."""
    return [0] if k == 1 else [round(i * (n_layers - 1) / (k - 1)) for i in range(k)]


def _values(loaded: LoadedModel, config: ShareLayersConfig, groups: list[list[int]], fits: dict[tuple[int, str], GroupFit]):
    """block, role -> the block's initial shared weight (fitted, mean of its depths, or the kept layer's)."""
    spec, layers = arch_for(loaded.model), decoder_layers(loaded.model)
    sources = stepwise_sources(len(layers), len(groups))

    def value(block: int, role: str) -> torch.Tensor:
        path = spec.linear_paths[role]
        if config.init == "regmean":
            return fits[(block, role)].shared
        if config.init == "keep":
            return linear(layers[sources[block]], path).weight
        weights = [linear(layers[d], path).weight for d in groups[block]]
        return torch.stack([w.float() for w in weights]).mean(dim=0).to(weights[0].dtype)

    return value, sources


def apply(ctx: PassContext, config: ShareLayersConfig) -> PassReport:
    from kompakt.model.sharing import check_shareable, tie_layers

    loaded = ctx.loaded
    if is_quantized(loaded):
        raise ConfigError(f"{NAME}: {loaded.name} is quantized; share layers before quantizing")
    n_layers = len(decoder_layers(loaded.model))
    k = config.unique_blocks(n_layers)
    groups = groups_for(config.pattern, n_layers, k)
    before = loaded.num_parameters()
    _check_smaller(loaded, config, n_layers, k)
    check_shareable(loaded, groups)
    fits = _regmean_fits(ctx, config, groups) if config.uses_calibration() else {}
    value, sources = _values(loaded, config, groups, fits)
    block_of = {depth: (block, group.index(depth)) for block, group in enumerate(groups) for depth in group}

    def deltas(depth: int, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        block, position = block_of[depth]
        return fits[(block, role)].deltas[position]

    loaded, changes = tie_layers(loaded, groups, value, config.relax_rank, deltas if fits else None)
    after = loaded.num_parameters()
    init = f"keep layers {sources}" if config.init == "keep" else config.init
    summary = (f"{n_layers} layers -> {k} unique blocks x {n_layers // k} ({config.pattern}, {init}, "
               f"relax rank {config.relax_rank}): {before / 1e6:.1f} M -> {after / 1e6:.1f} M parameters")  # fmt: skip
    logger.info("%s: %s", NAME, summary)
    details = {**changes, "pattern": config.pattern, "init": config.init, "groups": groups,
               **({"kept_layers": sources} if config.init == "keep" else {}), **_fit_details(fits)}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary, details=details)


def _regmean_fits(ctx: PassContext, config: ShareLayersConfig, groups: list[list[int]]) -> dict[tuple[int, str], GroupFit]:
    """(block, role) -> the block's fitted shared weight and deltas, from the inputs each depth of
    the unchanged model sees on the calibration blocks. A group is fitted as soon as its last depth
    has run, and its Gram matrices are dropped."""
    from kompakt.calib import LayerStats, run_sequential

    model = ctx.loaded.model
    spec, layers = arch_for(model), decoder_layers(model)
    block_of = {depth: block for block, group in enumerate(groups) for depth in group}
    grams: dict[tuple[int, str], torch.Tensor] = {}
    fits: dict[tuple[int, str], GroupFit] = {}

    def process(index: int, layer: torch.nn.Module, stats: LayerStats) -> None:
        finalized: dict[int, torch.Tensor] = {}  # q, k, v (gate, up) read one tensor: one Gram
        for role, stat in stats.items():
            if id(stat.hessian_acc) not in finalized:
                finalized[id(stat.hessian_acc)] = stat.hessian()
            grams[(index, role)] = finalized[id(stat.hessian_acc)]
        block = block_of[index]
        group = groups[block]
        if all((depth, role) in grams for depth in group for role in spec.linear_paths):
            for role, path in spec.linear_paths.items():
                weights = [linear(layers[depth], path).weight for depth in group]
                rank = min(config.relax_rank, *weights[0].shape)
                fits[(block, role)] = merge_group(weights, [grams.pop((depth, role)) for depth in group], rank,
                                                  rounds=config.rounds)  # fmt: skip

    blocks = ctx.calibration()[: config.max_blocks]
    run_sequential(model, blocks, process, roles=list(spec.linear_paths), collect="hessian", true_sequential=False,
                   batch_size=config.batch_size, description=f"{NAME} (regmean)")  # fmt: skip
    return fits


def _fit_details(fits: dict[tuple[int, str], GroupFit]) -> dict[str, dict[str, float]]:
    """The share of each role's output energy the fit misses, averaged over the depths."""
    if not fits:
        return {}
    errors: dict[str, list[float]] = {}
    for (_, role), fit in fits.items():
        errors.setdefault(role, []).extend(fit.relative_error)
    return {"output_error": {role: round(sum(e) / len(e), 4) for role, e in errors.items()}}


def _check_smaller(loaded: LoadedModel, config: ShareLayersConfig, n_layers: int, k: int) -> None:
    """ConfigError (before any change) when the deltas would cost at least what sharing saves."""
    spec, layer = arch_for(loaded.model), decoder_layers(loaded.model)[0]
    shapes = [tuple(linear(layer, path).weight.shape) for path in spec.linear_paths.values()]
    saved = (n_layers - k) * sum(o * i for o, i in shapes)
    added = n_layers * sum(min(config.relax_rank, o, i) * (o + i) for o, i in shapes)
    if added >= saved:
        raise ConfigError(f"{NAME}: relax_rank {config.relax_rank} adds {added:,} parameters, at least the {saved:,} "
                          "that sharing saves; lower relax_rank or share more layers")  # fmt: skip


PASS = PassSpec(name=NAME, config=ShareLayersConfig, apply=apply, changes_architecture=True, needs_calibration=True,
                dense_only="it ties the Linears of whole decoder layers, and an MoE layer's experts are fused "
                "parameters it does not tie; remove experts with moe.prune / moe.merge or layers with prune.depth",
                doc=__doc__ or "")  # fmt: skip
