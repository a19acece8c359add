"""AWQ: activation-aware weight scaling before quantization (Lin et al. 2023, arXiv:2306.00978).

Input channels with large activations make their weight columns salient. AWQ scales those
columns up by s = mean|x|^α (α searched in [0, 1] per scaling point, `n_grid` steps) and folds
1/s into the op that produces the input, so the float model computes the same function while
the following quantizer rounds the salient weights more finely. The math (scale search on the
input Gram matrix, clipping search) is in `kompakt.ops.awq`. Scaling points, found by role
(kompakt.model.arch), never by module name:

- pre-attention norm → q, k, v (or fused qkv); pre-MLP norm → gate, up (or fused gate_up).
  Gemma norms compute x·(1 + w): w' = (1 + w)/s − 1. (Gemma 2/3's post_attention_layernorm
  normalises the attention *output* and is not touched.)
- v → o: exact when o reads the heads' V outputs unchanged (grouped-query attention: one
  scale per KV-head channel, repeated over the query heads that share it). Skipped, and
  reported, when the shapes do not allow it.
- up → down (the gate's activation multiplies up, so scaling up's rows scales down's inputs).
- Mixture of Experts: up → down per expert, searched on the tokens routed to that expert
  (kompakt.calib.experts; starved experts on all tokens, named in the notes), and clipping per
  expert Linear. The pre-MLP norm feeds the router and every expert at once, so no scale is
  folded into it (the experts' gate/up are only clipped).

With `tensor_types` (as the quantizer's, kompakt.passes.quant_types) each Linear's error is
measured on its own type's grid; a scale shared by Linears of different types minimises their
summed error.

`clip: true` (default) also searches a per-(row, group) clipping range for every Linear except
q and k (their error passes through softmax), as the reference does; clipping changes the
float weights slightly (that is its point).

AWQ only rescales (and clips): it does not quantize. Put `quant.rtn` or `quant.gptq` after it
with the same grid (bits / group_size / symmetric / format): the search optimises for that grid,
and the quant step warns when the grids differ. Before GPTQ, `quant.gptq: {awq: true}` does both
in one calibration run (about half the time; `AwqScaler` is its first phase). It runs layer by layer through
`kompakt.calib.run_sequential` on the float model (as the reference does), so it composes with
either quantizer. Use it at 4 bits and below, especially before RTN or on a GGUF grid.

Sample recipe steps::

    - quant.awq: {bits: 4, group_size: 64}
    - quant.gptq: {bits: 4, group_size: 64}

    - quant.awq: {format: q4_0}
    - quant.rtn: {format: q4_0}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kompakt.calib import LayerStats, run_sequential
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, fused_splits, linear_modules, norm_modules, text_config
from kompakt.model.compression import AwqScaling, get_state, update_state
from kompakt.model.moe import all_roles, expert_linear_modules, expert_role, is_expert_role, parse_expert_role
from kompakt.model.quantized import ensure_not_quantized
from kompakt.ops.awq import search_clip, search_scales
from kompakt.ops.quant import QuantGrid
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.passes.quant_common import QuantGridConfig, plan_grid, rtn_weight, select_targets, target_types
from kompakt.passes.streaming import layer_writer

logger = logging.getLogger(__name__)

NO_CLIP = ("attn.q", "attn.k", "attn.qkv")


@dataclass
class AwqConfig:
    bits: int = field(default=4, metadata=doc("bits of the quantizer that follows: 8, 4, 3, 2"))
    group_size: int | None = field(default=128, metadata=doc("its group size: 32, 64, 128, null = per channel"))
    symmetric: bool = field(default=True, metadata=doc("its grid is symmetric"))
    format: str | None = field(default=None, metadata=doc("or its GGUF type, e.g. q4_0, q8_0, q5_0"))
    tensor_types: dict[str, str] | None = field(default=None, metadata=doc("and its per-module GGUF types"))
    n_grid: int = field(default=20, metadata=doc("alpha takes i/n_grid, i = 0..n_grid"))
    clip: bool = field(default=True, metadata=doc("also search weight clipping ranges (not for q, k)"))
    max_shrink: float = field(default=0.5, metadata=doc("clipping range shrinks by at most this fraction"))
    v_to_o: bool = field(default=True, metadata=doc("scale o_proj's inputs, folded into v_proj"))
    up_to_down: bool = field(default=True, metadata=doc("scale down_proj's inputs, folded into up_proj"))
    max_blocks: int | None = field(default=None, metadata=doc("use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("calibration blocks per layer call"))

    def grid(self) -> QuantGridConfig:
        return QuantGridConfig(self.bits, self.group_size, self.symmetric, self.format, tensor_types=self.tensor_types)

    def validate(self) -> None:
        grid = self.grid()
        grid.validate_grid("quant.awq")
        self.group_size, self.format, self.tensor_types = grid.group_size, grid.format, grid.tensor_types
        if self.n_grid < 1 or self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError("quant.awq: n_grid, batch_size and max_blocks must be at least 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"quant.awq: max_shrink must be in [0, 1), got {self.max_shrink}")


# The scale and clipping searches round each candidate dozens of times; llama.cpp's rounding of
# iq4_nl and the K-quants is itself a search (seconds per matrix), so they search with the
# closed-form integer grid of the same bits and block (bits, group, symmetric) instead. The
# following GPTQ / RTN step then rounds on the type's real grid. (AWQ's reference searches with
# plain RTN for every target format in the same spirit.)
SEARCH_STAND_INS = {"iq4_nl": (4, 32, True), "q6_k": (6, 16, True), "q5_k": (5, 32, False),
                    "q4_k": (4, 32, False), "q3_k": (3, 16, True), "q2_k": (2, 16, False)}  # fmt: skip


def _search_group(plan) -> int | None:
    """Columns per scale of the grid the searches round on."""
    return SEARCH_STAND_INS[plan.type][1] if plan.type in SEARCH_STAND_INS else plan.group_size


def _identity(w: torch.Tensor) -> torch.Tensor:
    return w


def _rows(role: str, model: nn.Module) -> tuple[str, slice] | None:
    """(Linear role, row slice) holding `role`'s output rows ("attn.v" inside a fused qkv)."""
    spec = arch_for(model)
    if role in spec.linear_paths:
        return role, slice(None)
    fused = "attn.qkv" if role.startswith("attn.") else "mlp.gate_up"
    parts = fused_splits(model)[fused]
    start = 0
    for name, n in parts.items():
        if name == role:
            return fused, slice(start, start + n)
        start += n
    return None


class AwqScaler:
    """Per-layer scale search and folding; `process` is the sequential driver's callback (also
    the first phase of quant.gptq with `awq: true`)."""

    def __init__(self, model: nn.Module, config: AwqConfig) -> None:
        self.model, self.config, self.grid = model, config, config.grid()
        self.spec = arch_for(model)
        # Every Linear's own type (checked before any work: unknown keys, rows a type cannot take).
        targets = select_targets(model, QuantGridConfig(), "quant.awq")
        types = target_types(model, self.grid, targets, "quant.awq")
        self.types = {t.module: types.get(t.name) for t in targets}
        self.log: dict[str, Any] = {}
        self.notes: list[str] = []

    def process(self, index: int, layer: nn.Module, stats: LayerStats) -> None:
        roles = set(stats.keys())
        if any(is_expert_role(role) for role in roles):
            if self.config.up_to_down:
                self._scale_experts_down(index, layer, stats)
        elif roles & {"attn.q", "attn.qkv"}:
            self._scale_after_norm(index, layer, stats, "attn.pre")
        elif roles & {"mlp.gate", "mlp.gate_up"}:
            self._scale_after_norm(index, layer, stats, "mlp.pre")
        elif "attn.o" in roles and self.config.v_to_o:
            self._scale_v_to_o(index, layer, stats)
        elif "mlp.down" in roles and self.config.up_to_down:
            self._scale_from(index, stats, None, ("mlp.up", layer), "mlp.up")
        if self.config.clip:
            self._clip(stats)

    def _scale_experts_down(self, index: int, layer: nn.Module, stats: LayerStats) -> None:
        """Per expert: down's input columns scaled, folded into the same expert's up rows (its
        gate's activation multiplies up), searched on the expert's routed tokens."""
        views = expert_linear_modules(layer, self.spec.moe)
        for role, stat in stats.items():
            expert, part = parse_expert_role(role)
            if part == "down":
                up = views[expert_role(expert, "up")]
                self._scale_from(index, {role: stat}, None, up, f"experts.{expert}.up")  # type: ignore[arg-type]

    def _scale_after_norm(self, index: int, layer: nn.Module, stats: LayerStats, role: str) -> None:
        """Fold into a pre-norm only when it feeds exactly this group (not a shared parallel-block norm)."""
        paths = self.spec.norm_paths
        if role not in paths or list(paths.values()).count(paths[role]) > 1:
            self._note(f"{role} norm scaling skipped: no separate {role} norm in this architecture")
            return
        self._scale_from(index, stats, norm_modules(layer, self.spec)[role], None, role)

    @torch.no_grad()
    def _scale_from(self, index: int, stats: LayerStats, norm, producer, label: str, expand=None) -> None:
        first = next(iter(stats.values()))
        gram = first.hessian()
        act = first.mean_abs()
        if expand is not None:
            act = torch.zeros(int(expand.max()) + 1, device=act.device).index_add_(0, expand, act) / torch.bincount(expand).float()
        quantizers = [self._quantizer(stat.module) for stat in stats.values()]
        if all(q is None for q in quantizers):
            return
        found = search_scales([s.module.weight for s in stats.values()], gram, act,
                              [q or _identity for q in quantizers], n_grid=self.config.n_grid,
                              expand=expand)  # fmt: skip
        s = found.scales
        for stat in stats.values():  # W·diag(s): the consumer's columns grow
            stat.module.weight.mul_(s.to(stat.module.weight.dtype))
        if norm is not None:
            self._fold_norm(norm, s)
        else:
            self._fold_rows(producer, s if expand is None else self._reduce(s, expand))
        self._scaled_gram(stats, s)
        key = f"{index}.{label}"
        self.log[key] = {"alpha": found.alpha, "error": found.error, "error_unscaled": found.base_error}

    @staticmethod
    def _reduce(full: torch.Tensor, expand: torch.Tensor) -> torch.Tensor:
        reduced = torch.empty(int(expand.max()) + 1, dtype=full.dtype, device=full.device)
        reduced[expand] = full
        return reduced

    def _fold_norm(self, norm: nn.Module, s: torch.Tensor) -> None:
        """Divide the norm's output by s: (offset + w)/s − offset (and its bias, if any)."""
        offset = self.spec.norm_offset
        w = norm.weight
        w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))

    def _fold_rows(self, producer: tuple[str, nn.Module] | nn.Linear, s: torch.Tensor) -> None:
        """Divide the producing Linear's output rows (and bias) by s."""
        if isinstance(producer, nn.Linear):  # an expert's up (a view into the fused parameters)
            module, rows = producer, slice(None)
        else:
            role, layer = producer
            found = _rows(role, self.model)
            assert found is not None
            module = linear_modules(layer, self.spec)[found[0]]
            rows = found[1]
        module.weight[rows] = (module.weight[rows].float() / s.unsqueeze(1)).to(module.weight.dtype)
        if module.bias is not None:
            module.bias[rows] = (module.bias[rows].float() / s).to(module.bias.dtype)

    @staticmethod
    def _scaled_gram(stats: LayerStats, s: torch.Tensor) -> None:
        """The inputs are now x/s: keep the statistics consistent for the clipping search (once
        per accumulator: Linears reading the same input share theirs)."""
        for acc in {id(stat.hessian_acc): stat.hessian_acc for stat in stats.values()}.values():
            acc.sum_xxt.div_(torch.outer(s, s).to(acc.sum_xxt.dtype))

    def _scale_v_to_o(self, index: int, layer: nn.Module, stats: LayerStats) -> None:
        config = text_config(self.model)
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // heads
        o = stats["attn.o"].module
        if o.in_features != heads * hd or heads % kv:
            self._note(f"v->o scaling skipped: o_proj reads {o.in_features} inputs, not {heads} heads x {hd}")
            return
        # o's input column h·hd + d reads V channel (h // (heads/kv))·hd + d
        device = o.weight.device
        head = torch.arange(heads, device=device).repeat_interleave(hd) // (heads // kv)
        expand = head * hd + torch.arange(hd, device=device).repeat(heads)
        self._scale_from(index, stats, None, ("attn.v", layer), "attn.v", expand=expand)

    def _clip(self, stats: LayerStats) -> None:
        for role, stat in stats.items():
            if role in NO_CLIP:
                continue
            w = stat.module.weight
            quantize = self._quantizer(stat.module)
            if quantize is None:
                continue
            group = _search_group(plan_grid(self.grid, w.shape[1], self.types.get(stat.module))) or w.shape[1]
            with torch.no_grad():
                new = search_clip(w, stat.hessian(), quantize, group, n_grid=self.config.n_grid,
                                  max_shrink=self.config.max_shrink)  # fmt: skip
                w.copy_(new.to(w.dtype))

    def _quantizer(self, module: nn.Module):
        """RTN onto `module`'s own grid (None when it stays unquantized); for the types whose
        reference rounding is an iterative search, its closed-form stand-in (SEARCH_STAND_INS)."""
        plan = plan_grid(self.grid, module.weight.shape[1], self.types.get(module))
        if plan.grid is None:
            return None
        if plan.type in SEARCH_STAND_INS:
            stand_in = QuantGrid(*SEARCH_STAND_INS[plan.type], scale_dtype=torch.float16)
            return stand_in.fake_quantize
        return lambda w: rtn_weight(w, self.grid, plan)[0]

    def summary(self) -> str:
        """What the search did, for a step's summary line."""
        scales = scales_summary(self.log)
        text = (f"{scales['points']} scaling points, output error x{scales['error_ratio_mean']:.2f} on average"
                f"{' + clipping' if self.config.clip else ''}")  # fmt: skip
        return "; ".join([text, *self.notes])

    def _note(self, text: str) -> None:
        if text not in self.notes:
            logger.warning("quant.awq: %s", text)
            self.notes.append(text)


def apply(ctx: PassContext, config: AwqConfig) -> PassReport:
    start = time.perf_counter()
    loaded = ctx.loaded
    ensure_not_quantized(loaded, "apply AWQ to")
    if get_state(loaded).lowrank:  # its scales would have to pass through a factor's rank dimension
        raise ConfigError("quant.awq: the model has factorized Linears (lowrank.svd); quantize them with "
                          "quant.gptq or quant.rtn instead")  # fmt: skip
    model = loaded.model
    awq = AwqScaler(model, config)  # resolves the per-tensor types first: bad ones fail before any work
    blocks = ctx.calibration()[: config.max_blocks]
    result = run_sequential(model, blocks, awq.process, roles=all_roles(model), collect="hessian",
                            true_sequential=True, batch_size=config.batch_size, description="AWQ scale search",
                            on_layer=layer_writer(ctx))  # fmt: skip
    awq.notes.extend(result.notes)
    grid = config.grid().grid_label
    update_state(loaded, awq=AwqScaling(grid=grid, clip=config.clip))
    scales = scales_summary(awq.log)
    summary = f"awq for {grid}: {awq.summary()}; quantize next with the same grid"
    details = {"grid": grid, "scales": scales, "notes": awq.notes, "calibration_blocks": list(blocks.shape),
               "seconds": time.perf_counter() - start}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary, details=details)


def scales_summary(log: dict[str, Any]) -> dict[str, Any]:
    """The scale search in a few numbers (lineage.jsonl holds one record per step, not per layer);
    the per-point values go to the debug log."""
    for point, found in log.items():
        logger.debug("quant.awq %s: alpha %.2f, error %.4g (unscaled %.4g)",
                     point, found["alpha"], found["error"], found["error_unscaled"])  # fmt: skip
    alphas = [v["alpha"] for v in log.values()]
    ratios = [v["error"] / v["error_unscaled"] for v in log.values() if v["error_unscaled"] > 0]
    return {"points": len(log), "alpha_min": min(alphas, default=0.0), "alpha_max": max(alphas, default=0.0),
            "alpha_mean": round(sum(alphas) / max(len(alphas), 1), 4),
            "error_ratio_mean": round(sum(ratios) / max(len(ratios), 1), 4)}  # fmt: skip


PASS = PassSpec(
    name="quant.awq", config=AwqConfig, apply=apply, needs_calibration=True, streams=True, doc=__doc__ or "",
    decoder_only="AWQ folds its activation scales into the norm before q/k/v and gate/up, and BERT-style "
    "encoders normalise after the residual add (post-LN), so there is no such norm; use quant.gptq "
    "(or quant.rtn at 8 bits)",
)
