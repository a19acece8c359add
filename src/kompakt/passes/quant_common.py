"""What the weight-quantization passes (quant.rtn, quant.gptq, quant.awq, quant.qat) share.

Not a pass itself (not in the registry): the grid config and its validation, the choice of
target modules by role, the grid each weight gets (with the group-size fallback), RTN of one
weight, and what a quant pass leaves behind: the grid in the typed compression state
(kompakt.model.compression), the packed layers for its PassReport, and a lineage-sized report.

Grids:
- integer grids: `bits` 8 / 4 / 3 / 2, `group_size` 32 / 64 / 128 input columns per scale (or
  null / 0 = one scale per output row), `symmetric` (q·s) or asymmetric ((q − z)·s). A group
  size that does not divide a layer's input width (SmolLM2: 576 with 128) falls back to the
  largest storable divisor (64) for that layer; the report counts such layers and names a few.
  Integer-grid scales are fitted in fp16 (what compressed-tensors stores), so what is stored
  is exactly what the pass optimised.
- `format`: a GGUF type (kompakt.ops.ggml_types: q8_0, q6_k, q5_1, q5_k, q5_0, q4_1, q4_k,
  iq4_nl, q4_0, q3_k, q2_k, where this version has its grid or encoder). Overrides bits / group /
  symmetric. Layers whose input width the type's block does not divide stay unquantized
  (reported). q4_0 / q8_0 blocks are stored packed as symmetric int4 / int8 groups of 32; the
  other types' steps stay dense, and the types the exporter cannot recover from dense weights
  (K-quants, ...) hand over their exact file bytes (LoadedModel.gguf_blocks).
- `tensor_types` (with `format`): a GGUF type per module (kompakt.passes.quant_types), recorded
  in the compression state's per_tensor_types for the GGUF export.

Modules: every Linear of the decoder layers by default; `modules` picks roles ("attn", "mlp",
"attn.q", ..., "mlp.down"; an MoE's experts are "mlp.experts.<e>.<gate|up|down>", views into
the fused expert parameters, stored dense at their exact values since compressed-tensors packs
Linears only); `embeddings: true` / `lm_head: true` add those (with tied
embeddings both flags mean the same matrix). The weights keep their exact dequantized values in
fp32 (the storage dtype is raised to fp32 when it was lower, so saving does not round them).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, embeddings_tied, get_submodule, linear_modules, linear_path
from kompakt.model.basis_sharing import shares_only_factors
from kompakt.model.compression import PackedLayer, Quantization, get_state, nominal_bits, update_state
from kompakt.model.gguf_blocks import GgufBlocks
from kompakt.model.loaded import LoadedModel
from kompakt.model.moe import expert_linear_modules, expert_module_name
from kompakt.model.quantized import SCALE_DTYPE, ensure_not_quantized, storage_grid
from kompakt.ops import ggml_types
from kompakt.ops.ggml_types import ASYMMETRIC
from kompakt.ops.gguf_grid import BLOCK, FORMATS, dequantize_blocks, pack_blocks, quantize_blocks
from kompakt.passes.base import PassContext, doc
from kompakt.passes.quant_types import check_tensor_types, check_type, gguf_grid, resolve_types, types_label

logger = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")
MODULE_NAMES = ("attn", "mlp", *ROLES)
MOE_ROLES = ("mlp.experts.0.gate", "mlp.experts.0.up", "mlp.experts.0.down", "mlp.shared_gate", "mlp.shared_up",
             "mlp.shared_down")  # examples of the MoE roles a pattern may match (kompakt.model.moe)
# GGUF types whose blocks store a minimum beside the scale (the others are symmetric grids).
NAMES_SHOWN = 3  # module names a summary line or lineage record shows before "..."


@dataclass
class QuantGridConfig:
    """The grid and module options every weight quantizer shares (rtn, gptq, awq's search grid)."""

    bits: int = field(default=4, metadata=doc("integer bits: 8, 4, 3 or 2"))
    group_size: int | None = field(
        default=128, metadata=doc("input columns per scale: 32, 64, 128; null or 0 = per output channel")
    )
    symmetric: bool = field(default=True, metadata=doc("symmetric q*s (true) or asymmetric (q-z)*s"))
    format: str | None = field(
        default=None, metadata=doc("GGUF type, e.g. q4_0, q8_0, q5_0, q4_k (overrides bits/group_size/symmetric)")
    )
    tensor_types: dict[str, str] | None = field(
        default=None,
        metadata=doc("GGUF type per module {name or fnmatch pattern: type}; needs format (the default); "
                      "model.embed_tokens / lm_head keys round those to their type (RTN) too"),
    )  # fmt: skip
    types_source: str | None = field(
        default=None, metadata=doc("where tensor_types came from, for the GGUF metadata (default: recipe)")
    )
    modules: list[str] | str | None = field(
        default=None, metadata=doc("Linear roles: attn, mlp, attn.q, ..., mlp.down, or patterns (default all)")
    )
    embeddings: bool = field(default=False, metadata=doc("also quantize the input embeddings (RTN)"))
    lm_head: bool = field(default=False, metadata=doc("also quantize the output projection (RTN)"))

    def validate_grid(self, name: str) -> None:
        """Check the options (one ConfigError line each)."""
        if self.format is not None:
            self.format = check_type(self.format, f"{name}: format")
            if self.format in ggml_types.FLOAT_TYPES:
                raise ConfigError(f"{name}: format {self.format} is no quantized type; choose e.g. q4_0 or q8_0")
        self.tensor_types = check_tensor_types(self.tensor_types, self.format, name)
        if self.format is not None:
            return
        if self.bits not in BITS:
            raise ConfigError(f"{name}: bits {self.bits} is not supported; choose one of {', '.join(map(str, BITS))}")
        if self.group_size == 0:
            self.group_size = None
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"{name}: group_size {self.group_size} is not supported; choose 32, 64, 128 or null (per channel)"
            )
        role_patterns(self.modules, name)

    @property
    def grid_label(self) -> str:
        if self.format:
            return types_label(self.format, self.tensor_types)
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"

    @classmethod
    def of(cls, quantization: Quantization, per_tensor_types: dict[str, str] | None = None) -> QuantGridConfig:
        """The grid a previous quant step recorded (its modules are listed in `quantization`, the
        type of each in `per_tensor_types` when it mixed them)."""
        if quantization.gguf_format:
            mixed = {m: t for m, t in (per_tensor_types or {}).items() if m in quantization.modules}
            return cls(format=quantization.gguf_format, tensor_types=mixed or None)
        return cls(bits=quantization.bits, group_size=quantization.group_size, symmetric=quantization.symmetric)


def role_patterns(modules: list[str] | str | None, name: str) -> list[str]:
    """`modules` as fnmatch patterns over roles ("attn" -> "attn.*"); [] = all."""
    if modules is None:
        return []
    names = [n.strip() for n in modules.split(",")] if isinstance(modules, str) else [str(n) for n in modules]
    patterns = [n + ".*" if n in ("attn", "mlp") else n for n in names if n]
    bad = [p for p in patterns if not any(fnmatchcase(r, p) for r in ROLES + MOE_ROLES)]
    if bad or not patterns:
        raise ConfigError(f"{name}: modules {bad or names} match no Linear role; valid: {', '.join(MODULE_NAMES)}")
    return patterns


@dataclass
class Target:
    """One weight to quantize: full module name, the module, its role ("attn.q", "embed", "lm_head")."""

    name: str
    module: nn.Module
    role: str
    layer: int | None = None


def _typed(config: QuantGridConfig, module: str) -> bool:
    """Whether `tensor_types` gives `module` (the embedding or output head) a quantized type."""
    return (config.tensor_types or {}).get(module, "f16") not in ggml_types.FLOAT_TYPES


def select_targets(model: nn.Module, config: QuantGridConfig, name: str) -> list[Target]:
    """Decoder Linears chosen by `modules`, then embeddings / lm_head when asked — also when
    `tensor_types` names them with a quantized type: they are rounded to it here (llama.cpp's
    rounding, exact bytes kept), so the step's measured KL is the written file's, not that of a
    model whose embedding the export alone would round."""
    if get_state(model).shared and not shares_only_factors(model):  # each depth would round the one shared
        # tensor again, and the deltas stay fp; a shared basis (share.basis) is one plain factor, rounded once
        raise ConfigError(f"{name}: the model's layers share weights (share.layers), which quantization does not "
                          "handle yet; quantize a model without share.layers")  # fmt: skip
    spec = arch_for(model)
    patterns = role_patterns(config.modules, name)
    targets = []
    for index, layer in enumerate(decoder_layers(model)):
        for role, module in linear_modules(layer, spec).items():
            if not patterns or any(fnmatchcase(role, p) for p in patterns):
                targets.append(Target(f"{spec.layers}.{index}.{linear_path(spec, role)}", module, role, index))
        if spec.moe is not None:  # the experts (fused parameters) as Linear views: roles "mlp.experts.<e>.<part>"
            for role, module in expert_linear_modules(layer, spec.moe).items():
                if not patterns or any(fnmatchcase(role, p) for p in patterns):
                    targets.append(Target(expert_module_name(spec, index, role), module, role, index))
    if not targets:
        raise ConfigError(f"{name}: modules {config.modules} match no Linear of this {spec.family} model")
    if config.lm_head and spec.lm_head is None:
        raise ConfigError(f"{name}: lm_head: true, but this {spec.family} encoder has no output head; drop lm_head")
    tied = embeddings_tied(model)
    embeddings, lm_head = config.embeddings or _typed(config, spec.embed), config.lm_head or _typed(config, spec.lm_head)
    if embeddings or (lm_head and tied):
        targets.append(Target(spec.embed, get_submodule(model, spec.embed), "embed"))
    if lm_head and not tied:
        targets.append(Target(spec.lm_head, get_submodule(model, spec.lm_head), "lm_head"))
    if tied and config.embeddings != config.lm_head:
        logger.warning("%s: embeddings and lm_head are tied; both are quantized (one matrix)", name)
    return targets


@dataclass
class GridPlan:
    """The grid one weight gets: an integer QuantGrid or a GGUF type's grid (GGUFBlockGrid,
    KQuantGrid); None = left unquantized. `type`: the weight's GGUF type (None on integer grids)."""

    grid: Any
    group_size: int | None
    note: str | None = None  # why the requested grid was changed (fallback or skipped)
    type: str | None = None


def plan_grid(config: QuantGridConfig, in_features: int, type: str | None = None) -> GridPlan:
    """The grid of one weight; integer grids follow kompakt.model.quantized.storage_grid (the
    fallback rule the sensitivity analysis shares), and a changed group size gets a note.

    `type`: the weight's own GGUF type (`target_types`), else `config.format`.
    """
    ttype = type or config.format
    if ttype in ggml_types.FLOAT_TYPES:
        return GridPlan(None, None, f"kept in {ttype} (tensor_types)", ttype)
    if ttype:
        block = ggml_types.ggml_type(ttype).block
        if in_features % block:
            return GridPlan(None, None, f"input width {in_features} is not a multiple of {block}: left unquantized")
        return GridPlan(gguf_grid(ttype), block, type=ttype)
    grid = storage_grid(in_features, config.bits, config.group_size, config.symmetric)
    note = None
    if config.group_size is not None and config.group_size < in_features and in_features % config.group_size:
        note = f"group size {config.group_size} does not divide {in_features}: used {grid.group_size or 'per-channel'}"
    return GridPlan(grid, grid.group_size, note)


def target_types(model: nn.Module, config: QuantGridConfig, targets: list[Target], name: str) -> dict[str, str]:
    """Module -> GGUF type of every target (and of the head keys `tensor_types` names), checked
    before any work (kompakt.passes.quant_types); {} on integer grids."""
    if not config.format:
        return {}
    rows = {t.name: int(t.module.weight.shape[1]) for t in targets}
    return resolve_types(model, config.tensor_types, rows, config.format, name)


def packed_from(codes: torch.Tensor, scales: torch.Tensor, zeros, config: QuantGridConfig, plan: GridPlan):
    """The compressed-tensors record of a quantized weight (None for GGUF types but q4_0 / q8_0).

    q4_0 and q8_0 blocks are symmetric int4 / int8 groups of 32 with an fp16 scale (q4_0's file
    codes 0..15 mean code - 8), so they store packed exactly; q4_1's fp16 block minimum is not an
    integer zero point (nor are the other types' scales and minima), so such a step stays dense.
    """
    if plan.type is not None:
        if plan.type not in ("q4_0", "q8_0"):
            return None
        signed = codes.cpu() - 8 if plan.type == "q4_0" else codes.cpu()
        return PackedLayer(signed.to(torch.int8), scales.cpu().to(SCALE_DTYPE), None, 4 if plan.type == "q4_0" else 8,
                           BLOCK, True)  # fmt: skip
    zero = None if zeros is None else zeros.cpu()
    scale = scales.cpu().to(plan.grid.scale_dtype)  # exact: the grid rounded them to this dtype
    # The smallest integer type that holds the codes (a quarter of int32's memory: a streamed 7B layer's
    # codes wait in memory until the layer is written); the values, and what is stored, are unchanged.
    small = torch.int8 if config.symmetric or config.bits <= 7 else torch.int16
    return PackedLayer(codes.cpu().to(small), scale, zero, config.bits, plan.group_size, config.symmetric)


@torch.no_grad()
def rtn_weight(weight: torch.Tensor, config: QuantGridConfig, plan: GridPlan):
    """RTN of one weight [out, in]: (dequantized fp32, PackedLayer or None, GgufBlocks or None).

    GGUF types are llama.cpp's reference rounding bit for bit; a type the step cannot store
    packed (all but q4_0 / q8_0) also returns its file bytes, so export writes them as they are.
    """
    w = weight.detach().float()
    if plan.type in FORMATS:
        q, d, m = quantize_blocks(w.cpu(), plan.type)
        packed = packed_from(q, d, m, config, plan)
        blocks = None if packed is not None else GgufBlocks(plan.type, pack_blocks(q, d, m, plan.type))
        return dequantize_blocks(q, d, m, plan.type).to(w.device), packed, blocks
    if plan.type is not None:
        data = ggml_types.quantize(w.cpu().numpy(), plan.type)
        values = torch.from_numpy(ggml_types.dequantize(data, plan.type, tuple(w.shape)))
        return values.to(w.device), None, GgufBlocks(plan.type, data)
    q, scale, zero = plan.grid.quantize(w)
    return plan.grid.dequantize(q, scale, zero), packed_from(q, scale, zero, config, plan), None


@dataclass
class Quantized:
    """What quantizing a set of targets produced: the plan of each, its packed layer (for the
    compressed-tensors step save) and its exact GGUF bytes (for export), by module name."""

    plans: dict[str, GridPlan] = field(default_factory=dict)
    packed: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, GgufBlocks] = field(default_factory=dict)

    def update(self, other: Quantized) -> None:
        self.plans.update(other.plans)
        self.packed.update(other.packed)
        self.blocks.update(other.blocks)


def rtn_targets(targets: list[Target], config: QuantGridConfig, types: dict[str, str] | None = None) -> Quantized:
    """RTN every target in place, each on its own type (`types`, from target_types)."""
    done = Quantized()
    rounded: set[int] = set()
    for target in targets:
        weight = target.module.weight
        plan = plan_grid(config, weight.shape[1], (types or {}).get(target.name))
        done.plans[target.name] = plan
        if plan.grid is None or id(weight) in rounded:  # a shared basis: rounded once, at its first user
            continue
        rounded.add(id(weight))
        new, packed_layer, blocks = rtn_weight(weight, config, plan)
        weight.data.copy_(new.to(weight.dtype))
        if target.role != "embed":  # compressed-tensors packs Linears only
            done.packed[target.name] = packed_layer
        if blocks is not None:
            done.blocks[target.name] = blocks
    return done


def prepare(ctx: PassContext, name: str, config: QuantGridConfig) -> LoadedModel:
    """Checks every quant pass makes first; switches the storage dtype to fp32 (exact values)."""
    loaded = ctx.loaded
    ensure_not_quantized(loaded)
    awq = get_state(loaded).awq
    if awq is not None and awq.grid != config.grid_label:
        logger.warning("%s: AWQ searched its scales for %s but this step quantizes to %s",
                       name, awq.grid, config.grid_label)  # fmt: skip
    if loaded.storage_dtype != torch.float32:
        logger.warning("%s: storage dtype %s would round the quantized values; saving in float32",
                       name, loaded.storage_dtype)  # fmt: skip
        loaded.storage_dtype = torch.float32
    return loaded


def calibration_label(n_blocks: int, block_len: int) -> str:
    """What a GPTQ step solved on, as its GGUF metadata says (kompakt.calibration); the planner
    sizes a planned file's header with the same text."""
    return f"{n_blocks} blocks of {block_len} tokens (GPTQ Hessians)"


def record(loaded: LoadedModel, method: str, config: QuantGridConfig, done: Quantized,
           types: dict[str, str] | None = None, calibration: str = "") -> dict[str, PackedLayer]:  # fmt: skip
    """Record the grid in the compression state, the per-tensor types (when the step mixes
    them; merged over what a previous step recorded) and the exact GGUF bytes on the model;
    returns the packed layers for the pass report (PassReport.packed_layers, from which the
    step is saved packed). `calibration`: what the step solved on, for the GGUF metadata."""
    plans = done.plans
    fmt = config.format
    quantization = Quantization(
        method=method,
        format=fmt or f"int{config.bits}",
        bits=nominal_bits(fmt) if fmt else config.bits,
        group_size=ggml_types.ggml_type(fmt).block if fmt else config.group_size,
        symmetric=fmt not in ASYMMETRIC if fmt else config.symmetric,
        modules=tuple(n for n, p in plans.items() if p.grid is not None),
        group_sizes={} if fmt else {n: p.group_size for n, p in plans.items() if p.grid is not None and p.note},
    )
    changes: dict[str, Any] = {"quantization": quantization}
    if config.tensor_types:
        before = get_state(loaded)  # a QAT step keeps what the step before it recorded
        changes["per_tensor_types"] = {**before.per_tensor_types, **(types or {})}
        source = {"source": config.types_source or before.types_source.get("source") or "recipe",
                  "calibration": calibration or before.types_source.get("calibration", "")}  # fmt: skip
        changes["types_source"] = {k: v for k, v in source.items() if v}
    update_state(loaded, **changes)
    loaded.gguf_blocks.update(done.blocks)
    if get_state(loaded).shared:  # compressed-tensors cannot store a tie: the step is saved unpacked (fp32)
        return {}
    # compressed-tensors packs Linears only: fused MoE experts are stored dense at their exact values (fp32)
    return {n: p for n, p in done.packed.items() if p is not None and n in linear_names(loaded.model)}


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def few(names: list[str]) -> str:
    """At most NAMES_SHOWN names, then how many more: what a summary line can afford."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")


def notes_of(done: dict[str, GridPlan], name: str) -> list[str]:
    """One line per distinct change of the requested grid, with a few of its layers; the log
    gets every layer name."""
    by_note: dict[str, list[str]] = {}
    for module, plan in done.items():
        if plan.note:
            by_note.setdefault(plan.note, []).append(module)
    for note, mods in by_note.items():
        logger.warning("%s: %s (%d layers: %s)", name, note, len(mods), ", ".join(mods))
    return [f"{note} ({len(mods)} layers: {few(mods)})" for note, mods in by_note.items()]


def grid_counts(config: QuantGridConfig, done: dict[str, GridPlan]) -> dict[str, int]:
    """How many weights got which grid ("int4 g64": 24, "int4 g32": 4, "unquantized": 1)."""

    def label(plan: GridPlan) -> str:
        if plan.grid is None:
            return plan.type or "unquantized"
        if plan.type:
            return plan.type
        return f"int{config.bits} " + (f"g{plan.group_size}" if plan.group_size else "per-channel")

    return dict(Counter(label(plan) for plan in done.values()))


def summary_line(method: str, config: QuantGridConfig, done: dict[str, GridPlan], notes: list[str]) -> str:
    n = sum(p.grid is not None for p in done.values())
    text = f"{method} {config.grid_label}: {n} weights quantized"
    if notes:
        text += "; " + "; ".join(notes)
    return text
