"""share.basis: adjacent layers share one whitened SVD basis per matrix type; each keeps its coefficients.

Paper: Wang et al. 2024, "Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model
Compression" (arXiv:2410.03765; reference code TUDa-HWAI/Basis_Sharing). Training-free. The
decoder Linears of one type (q, k, v, o, gate, up, down) in a group of n adjacent layers become
LowRankLinears W_i ≈ B_i·A_i whose shared factor is one tensor for the whole group, so the
group pays for the basis once: a rank-k group costs k·(in + n·out) or k·(out + n·in) parameters
instead of n·k·(in + out). The math (kompakt.ops.basis) whitens with the calibration Grams as
SVD-LLM does, and the basis can be shared on either side:

- "in" (the paper's): the input-side factor A [k, in] is shared; suits the Linears that read the
  residual stream (q, k, v, gate, up), whose coordinates all layers have in common. Each layer's
  B_i is refit in closed form on its own calibration Gram.
- "out": the output-side factor B [out, k] is shared; suits the Linears that write the residual
  stream (o, down). The stacked truncation is exactly optimal for the group.

Per matrix type the side and the group size (`group_sizes`, default 1, 2, 4, 8 adjacent layers;
1 = no sharing, plain per-layer SVD-LLM) are chosen from the whitened calibration loss
‖(W − BA)Xᵀ‖²/‖WXᵀ‖² (summed over the type's Linears) at equal parameter count; the paper reports
which types share well, here it is measured per model and budget. `choose: type` (default): each
type's candidates are compared at the type's own share of the budget (1 − target_params of its
parameters). `choose: global`: coordinate descent on the loss of the whole-budget allocation,
from per-layer SVD-LLM (each type in turn takes the candidate that lowers the total most), which
never loses to SVD-LLM on that loss — but that loss is a poor proxy for perplexity here: on
SmolLM2 at 20 % it shared one group and ended where SVD-LLM does (ppl ×3.73 vs ×3.74), while
`type` shared v, gate and up in groups of 4 on the input side (×3.34, KL 1.29 vs 1.40; reduced
bench/lowrank.py run). At 40 % `type` shares nothing the allocation keeps and equals SVD-LLM
(×16.37); `global` shares up in pairs (×16.66). A layer count that a
size does not divide leaves a smaller last group. Then one global allocation
(kompakt.ops.rank_alloc, as lowrank.svd) spends the budget over all groups: ranks are multiples
of 8 and always below the group's break-even rank; a group that would need more stays dense.

Budget: `target_params` is the fraction of the decoder Linear parameters removed (a shared
basis counted once; embeddings and lm_head excluded), as lowrank.svd's. All statistics come from
the unchanged model in one calibration run (no sequential update, as the paper).

The result holds each basis once (kompakt.model.basis_sharing): saved once, rebuilt by
`kompakt.load`, one gradient in distill.kd, counted once. Export: `--merge` writes the dense
products (back to full size); without it a one-line refusal. quant.rtn / quant.gptq quantize the
factors afterwards, each shared basis once (GPTQ solves it on its first layer's Hessian); such a
step is saved unpacked (fp32), as compressed-tensors cannot store a tie.

When to use: instead of lowrank.svd when adjacent layers are alike (they are in pretrained LLMs:
the paper beats SVD-LLM at 20-50 % compression of LLaMA-7B), before healing with distill.kd.

Sample recipe steps::

    - share.basis: {target_params: 0.2}
    - share.basis: {target_params: 0.4, group_sizes: [2, 4], side: in}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from kompakt.calib import LayerStats, run_sequential
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, linear_modules, linear_path
from kompakt.model.basis_sharing import tie_factor
from kompakt.model.compression import get_state
from kompakt.model.lowrank import factorize_linear
from kompakt.model.quantized import is_quantized
from kompakt.ops import basis
from kompakt.ops.rank_alloc import allocate_ranks, parameters
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc

logger = logging.getLogger(__name__)

NAME = "share.basis"
SIDES = ("auto", *basis.SIDES)
DEFAULT_SIZES = (1, 2, 4, 8)
CHOOSE = ("type", "global")
RANK_MULTIPLE = 8
MAX_SWEEPS = 3  # coordinate descent over the types' group sizes; two sweeps usually settle it


@dataclass
class ShareBasisConfig:
    target_params: float = field(default=0.2, metadata=doc("fraction of decoder Linear parameters removed, in (0, 1)"))
    group_sizes: list[int] | None = field(
        default=None, metadata=doc("group sizes (adjacent layers) to try per matrix type: default [1, 2, 4, 8]; 1 = no sharing")
    )
    side: str = field(default="auto", metadata=doc("shared factor: in (input side), out, or auto (chosen per type)"))
    choose: str = field(default="type", metadata=doc(
        "how group sizes are chosen: type (each type at its share of the budget) or global (whole-budget loss)"))
    update: bool = field(default=True, metadata=doc("refit each layer's own factor on the compressed layers' outputs"))
    max_blocks: int | None = field(default=None, metadata=doc("use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("calibration blocks per layer call"))

    def validate(self) -> None:
        if not 0.0 < self.target_params < 1.0:
            raise ConfigError(f"{NAME}: target_params must be in (0, 1), e.g. 0.2; got {self.target_params}")
        sizes = self.group_sizes
        if sizes is not None and (not isinstance(sizes, list) or not sizes or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)):  # fmt: skip
            raise ConfigError(f"{NAME}: group_sizes must be a list of layer counts >= 1, e.g. [2, 4]; got {sizes!r}")
        if self.choose not in CHOOSE:
            raise ConfigError(f"{NAME}: choose {self.choose!r} is unknown; choose one of {', '.join(CHOOSE)}")
        if self.side not in SIDES:
            raise ConfigError(f"{NAME}: side {self.side!r} is unknown; choose one of {', '.join(SIDES)}")
        if self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError(f"{NAME}: batch_size and max_blocks must be at least 1")


@dataclass
class Group:
    """Adjacent layers whose Linears of one type share a basis (one layer: no sharing)."""

    names: list[str]
    modules: list[nn.Linear]
    grams: list[torch.Tensor]
    side: str
    spectrum: basis.GroupSpectrum
    rank: int | None = None


@dataclass
class RoleChoice:
    """One matrix type over all layers in groups of `size` sharing on `side` (a candidate, or the
    choice; `loss`: the global allocation's total loss once chosen)."""

    role: str
    side: str = "out"
    size: int = 1
    loss: float = 0.0
    groups: list[Group] = field(default_factory=list)


def _check_model(ctx: PassContext) -> None:
    state = get_state(ctx.loaded)
    if state.lowrank or state.shared:
        raise ConfigError(f"{NAME}: the model is already factorized or shares weights; run {NAME} once, on the dense model")
    if is_quantized(ctx.loaded):
        raise ConfigError(f"{NAME}: the weights are quantized; share the basis first, then quantize")


def _grams(ctx: PassContext, config: ShareBasisConfig) -> tuple[dict[tuple[int, str], torch.Tensor], list[int]]:
    """(layer, role) -> the calibration Gram of that Linear's inputs (CPU fp32; q/k/v share one)."""
    model = ctx.loaded.model
    blocks = ctx.calibration()[: config.max_blocks]
    grams: dict[tuple[int, str], torch.Tensor] = {}

    def process(index: int, layer: nn.Module, stats: LayerStats) -> None:
        seen: dict[int, torch.Tensor] = {}  # within one layer: Linears reading one input alias one accumulator
        for role, stat in stats.items():
            key = id(stat.hessian_acc)
            if key not in seen:
                seen[key] = stat.hessian().float().cpu()
            grams[(index, role)] = seen[key]

    run_sequential(model, blocks, process, collect="hessian", true_sequential=False, batch_size=config.batch_size,
                   description=NAME)  # fmt: skip
    return grams, [int(blocks.shape[0]), int(blocks.shape[1])]


def _roles(model: nn.Module) -> dict[str, list[tuple[str, nn.Linear]]]:
    """Role -> (name, Linear) per layer; ConfigError when the layers of a role differ in shape."""
    spec = arch_for(model)
    roles: dict[str, list[tuple[str, nn.Linear]]] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for role, module in linear_modules(layer, spec).items():
            roles.setdefault(role, []).append((f"{spec.layers}.{index}.{linear_path(spec, role)}", module))
    for role, members in roles.items():
        shapes = {tuple(m.weight.shape) for _, m in members}
        if len(shapes) > 1:
            raise ConfigError(f"{NAME}: the {role} Linears differ in shape across layers ({sorted(shapes)}), so they "
                              "cannot share a basis; run share.basis before per-layer width pruning")  # fmt: skip
    return roles


def _sizes(config: ShareBasisConfig, layers: int) -> list[int]:
    if config.group_sizes is None:
        return [s for s in DEFAULT_SIZES if s <= layers]
    too_big = [s for s in config.group_sizes if s > layers]
    if too_big:
        raise ConfigError(f"{NAME}: a group of {too_big[0]} layers does not fit the model's {layers} decoder layers; "
                          f"choose group_sizes up to {layers}")  # fmt: skip
    return sorted(set(config.group_sizes))


def _groups(members, grams, role: str, size: int, side: str, blocks: list[torch.Tensor]) -> list[Group]:
    """The role's layers in groups of `size` adjacent ones (a smaller last group), with spectra."""
    out = []
    for start in range(0, len(members), size):
        chunk = members[start : start + size]
        names, modules = [n for n, _ in chunk], [m for _, m in chunk]
        layer_grams = [grams[(start + i, role)] for i in range(len(chunk))]
        spectrum = basis.group_spectrum([m.weight for m in modules], layer_grams, side, torch.float32,
                                        blocks[start : start + size])  # fmt: skip
        out.append(Group(names, modules, layer_grams, side, spectrum))
    return out


def _loss(groups: list[Group], ranks: list[int | None]) -> float:
    """Summed relative whitened loss of the groups at `ranks` (dense: none)."""
    return sum(0.0 if r is None else float(g.spectrum.energy()[r:].sum()) for g, r in zip(groups, ranks))


def _candidates(role: str, members, grams, config: ShareBasisConfig, sizes: list[int]) -> list[RoleChoice]:
    """Every (group size, side) this type may take, with its groups' spectra (smallest size first)."""
    blocks: dict[str, list[torch.Tensor]] = {}  # side -> each layer's part of a stack Gram, computed once

    def of(side: str) -> list[torch.Tensor]:
        if side not in blocks:
            blocks[side] = [basis.layer_block(m.weight, grams[(i, role)], side) for i, (_, m) in enumerate(members)]
        return blocks[side]

    found = []
    for size in sizes:
        sides = ["out"] if size == 1 else (list(basis.SIDES) if config.side == "auto" else [config.side])
        for side in sides:  # one layer: both sides are plain per-layer SVD-LLM
            found.append(RoleChoice(role, side, size, 0.0, _groups(members, grams, role, size, side, of(side))))
    return found


def _global_loss(choices: list[RoleChoice], budget: int) -> float:
    """The summed relative loss of the global rank allocation over these choices (inf: does not fit)."""
    groups = [g for c in choices for g in c.groups]
    try:
        ranks = allocate_ranks([g.spectrum for g in groups], budget, RANK_MULTIPLE)
    except ValueError:
        return float("inf")
    return _loss(groups, ranks)


def _by_type(candidates: list[list[RoleChoice]], target: float) -> list[RoleChoice]:
    """Per type, the candidate with the lowest loss when that type alone keeps 1 − target of its
    parameters (the type's share of the budget; the smallest groups when none fits)."""
    chosen = []
    for options in candidates:
        dense = sum(m.weight.numel() for g in options[0].groups for m in g.modules)
        budget = int((1.0 - target) * dense)
        losses = [_global_loss([option], budget) for option in options]
        best = min(range(len(options)), key=lambda i: (losses[i], i))
        options[best].loss = losses[best]
        chosen.append(options[best])
    return chosen


def _select(candidates: list[list[RoleChoice]], budget: int) -> list[RoleChoice]:
    """One (group size, side) per type, by coordinate descent on the global allocation's loss:
    from the smallest groups (size 1: per-layer SVD-LLM), each type in turn takes the candidate
    that lowers the loss of the whole budget most, until a sweep changes nothing. So the choice
    is made at equal parameter count, and never loses to the starting point on this loss."""
    current = [options[0] for options in candidates]
    best = _global_loss(current, budget)
    for _ in range(MAX_SWEEPS):
        changed = False
        for index, options in enumerate(candidates):
            for option in options:
                trial = [*current[:index], option, *current[index + 1 :]]
                loss = _global_loss(trial, budget) if option is not current[index] else best
                if loss < best * (1 - 1e-9):
                    current, best, changed = trial, loss, True
        if not changed:
            break
    for choice in current:
        choice.loss = best
    return current


def _allocate(config: ShareBasisConfig, groups: list[Group], total: int) -> None:
    try:
        ranks = allocate_ranks([g.spectrum for g in groups], int((1.0 - config.target_params) * total), RANK_MULTIPLE)
    except ValueError as exc:
        raise ConfigError(f"{NAME}: target_params {config.target_params} cannot be met without exceeding dense "
                          f"({exc}); lower target_params")  # fmt: skip
    for group, rank in zip(groups, ranks):
        group.rank = rank


def _bases(groups: list[Group]) -> dict[int, torch.Tensor]:
    """id(group) -> its shared factor, from the unchanged model's Grams (groups of several layers)."""
    bases = {}
    for group in groups:
        if group.rank is not None and len(group.names) > 1:
            factors = basis.shared_factors([m.weight for m in group.modules], group.grams, group.side, group.rank)
            bases[id(group)] = factors.downs[0] if group.side == "in" else factors.ups[0]
    return bases


def _factorize_all(ctx: PassContext, config: ShareBasisConfig, groups: list[Group]) -> dict[str, float]:
    """Swap every allocated Linear for its factors, then tie each group's shared factor.

    With `update`, layer by layer on the sequential driver as lowrank.svd's svd-llm: each Linear's
    own factor (the whole factorization for a group of one) is fitted on the Gram of the inputs the
    already-compressed layers before it produce; otherwise on the unchanged model's Grams."""
    model = ctx.loaded.model
    bases = _bases(groups)
    todo = {name: (g, i) for g in groups if g.rank is not None for i, name in enumerate(g.names)}
    losses: dict[str, float] = {}

    def fit(name: str, module: nn.Linear, gram: torch.Tensor) -> None:
        group, _ = todo[name]
        up, down = basis.layer_factors(module.weight, gram, group.side, group.rank, bases.get(id(group)))  # type: ignore[arg-type]
        losses[name] = basis.relative_loss(module.weight, up, down, gram)
        factorize_linear(model, name, up=up, down=down, method="basis")

    if config.update:
        for group in groups:
            group.grams = []  # the unchanged model's Grams are no longer needed
        spec = arch_for(model)

        def process(index: int, layer: nn.Module, stats: LayerStats) -> None:
            for role, stat in stats.items():
                name = f"{spec.layers}.{index}.{linear_path(spec, role)}"
                if name in todo:
                    fit(name, stat.module, stat.hessian())

        blocks = ctx.calibration()[: config.max_blocks]
        run_sequential(model, blocks, process, collect="hessian", true_sequential=True, batch_size=config.batch_size,
                       description=f"{NAME} (update)")  # fmt: skip
    else:
        with torch.no_grad():
            for name, (group, i) in todo.items():
                fit(name, group.modules[i], group.grams[i])
    for group in groups:
        if group.rank is not None and len(group.names) > 1:
            tie_factor(model, group.names, group.side)
    return losses


def apply(ctx: PassContext, config: ShareBasisConfig) -> PassReport:
    start = time.perf_counter()
    _check_model(ctx)
    model = ctx.loaded.model
    roles = _roles(model)
    sizes = _sizes(config, len(decoder_layers(model)))
    grams, calibration = _grams(ctx, config)
    total = sum(m.weight.numel() for members in roles.values() for _, m in members)
    candidates = [_candidates(role, members, grams, config, sizes) for role, members in roles.items()]
    budget = int((1.0 - config.target_params) * total)
    choices = _select(candidates, budget) if config.choose == "global" else _by_type(candidates, config.target_params)
    groups = [g for c in choices for g in c.groups]
    _allocate(config, groups, total)
    after = parameters([g.spectrum for g in groups], [g.rank for g in groups])
    del grams
    losses = list(_factorize_all(ctx, config, groups).values())
    return _report(ctx, config, choices, groups, (total, after), losses, calibration, time.perf_counter() - start)


def _report(ctx: PassContext, config: ShareBasisConfig, choices: list[RoleChoice], groups: list[Group],
            params: tuple[int, int], losses: list[float], calibration: list[int], seconds: float) -> PassReport:  # fmt: skip
    total, after = params
    removed = 1.0 - after / total
    ranks = sorted(g.rank for g in groups if g.rank is not None)
    shared = sum(1 for g in groups if g.rank is not None and len(g.names) > 1)
    dense = sum(len(g.names) for g in groups if g.rank is None)
    types = {c.role: {"side": c.side if c.size > 1 else "layer", "group_size": c.size} for c in choices}
    details = {
        "target_params": config.target_params, "removed_params": removed, "linear_params": [total, after],
        "types": types, "shared_bases": shared, "factorized": len(losses), "dense": dense,
        "ranks": {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]} if ranks else {},
        "mean_truncation_loss": sum(losses) / max(len(losses), 1), "calibration_blocks": calibration,
        "choose": config.choose, "allocation_loss": choices[0].loss if config.choose == "global" else None,
        "seconds": seconds,
    }  # fmt: skip
    chosen = ", ".join(f"{role} {t['group_size']}{'' if t['group_size'] == 1 else '/' + t['side']}"
                       for role, t in types.items())  # fmt: skip
    summary = (f"{NAME}: {shared} shared bases over {len(losses)} Linears ({dense} kept dense), "
               f"{removed:.1%} of decoder Linear parameters removed; group size/side per type: {chosen}")  # fmt: skip
    return PassReport(loaded=ctx.loaded, summary=summary, details=details)


PASS = PassSpec(name=NAME, config=ShareBasisConfig, apply=apply, needs_calibration=True, changes_architecture=True,
                dense_only="it shares a basis between dense Linears of several layers, and an MoE's experts are "
                "fused parameters, not Linears; shrink experts with moe.prune / moe.merge",
                doc=__doc__ or "")  # fmt: skip
