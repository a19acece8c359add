"""GPTQ: quantize each Linear column by column, correcting the remaining columns for each error.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323). Per Linear it minimises ‖WX − ŴX‖²
using the Hessian H = 2/n·XᵀX of its calibration inputs (`kompakt.ops.gptq`): damping
(`percdamp` × mean diagonal), activation order (`act_order`: columns with the largest H_jj
first; groups stay contiguous in the original order, so the result is storable without g_idx),
lazy batch updates (`block_size` columns). It runs layer by layer through
`kompakt.calib.run_sequential`: every layer is calibrated on the outputs of the already
quantized layers before it, and within a layer {q,k,v}, o, {gate,up}, down are quantized one
after another (`true_sequential`), each on inputs produced by the already quantized ones.

Use it for 4 and 3 bits (clearly better than RTN there); at 8 bits RTN is as good and instant.
Linears that read the same tensor and get the same grid (q, k, v; gate, up) share one Hessian and
are solved as one weight with their rows stacked (GPTQ's rows are independent: same result, one
Cholesky and one column loop).

With AWQ (Lin et al. 2023, `kompakt.passes.quant_awq`): `awq: true` runs AWQ's scale and
clipping search (quant.awq's defaults, on this step's grid) inside the same calibration run, as
llm-compressor's sequential pipeline runs its modifiers on one capture: per layer, AWQ first
scales all groups on their float weights (phase 1), then GPTQ quantizes them true-sequentially
(phase 2), and the layer's outputs are propagated once. Layer 0 comes out bit-identical to a
`quant.awq` step followed by a `quant.gptq` step; from layer 1 on AWQ sees the outputs of the
already quantized layers before it (the inputs the layer will have) where the separate AWQ step
saw the float model's. About half the time of the two steps; the report carries AWQ's scaling
summary (`details.awq`). `awq_blocks` limits AWQ's statistics to the first blocks (whole
batches). The two-step form stays valid (e.g. AWQ before RTN). Grid options,
modules, the group-size fallback (576 with 128 → 64, reported) and what is left on the model
for storage / export are those of `quant.rtn` (see kompakt.passes.quant_common); with
`format:` a GGUF type GPTQ chooses values exactly on llama.cpp's grid of that type, and with
`tensor_types` each Linear on its own type's grid (kompakt.passes.quant_types). A grid whose
bytes cannot be recovered from the dense weights (K-quants: `pack(codes, scales, zeros)`) hands
them to the export as LoadedModel.gguf_blocks.
Embeddings / lm_head, when asked for, are quantized with RTN (no Hessian is collected there).

Mixture of Experts (Mixtral, Qwen-MoE, OLMoE): every expert is quantized on the Hessian of the
tokens its router sends to it (kompakt.calib.experts), gate/up first, then down on the outputs
of the quantized gate/up; an expert routed fewer than 32 calibration tokens is solved on all
tokens of its layer instead, and the step's notes name it. The router stays in full precision.

Sample recipe steps::

    - quant.gptq: {bits: 4, group_size: 64}
    - quant.gptq: {format: q4_0, act_order: true}
    - quant.gptq: {format: q4_0, awq: true, awq_blocks: 16}
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kompakt.calib import LayerStats, Phase, run_sequential
from kompakt.calib.threads import solver_threads
from kompakt.errors import ConfigError
from kompakt.model.compression import AwqScaling, update_state
from kompakt.model.gguf_blocks import GgufBlocks
from kompakt.model.inputs import batch_label
from kompakt.model.moe import all_roles
from kompakt.ops.gguf_grid import FORMATS, pack_blocks
from kompakt.ops.gptq import gptq_quantize
from kompakt.ops.hessian import HessianAccumulator
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.passes.quant_awq import AwqConfig, AwqScaler, scales_summary
from kompakt.passes.quant_common import (
    NAMES_SHOWN,
    GridPlan,
    QuantGridConfig,
    Quantized,
    Target,
    calibration_label,
    grid_counts,
    notes_of,
    packed_from,
    plan_grid,
    prepare,
    record,
    rtn_targets,
    select_targets,
    summary_line,
    target_types,
)
from kompakt.passes.streaming import layer_writer, materialize_targets

logger = logging.getLogger(__name__)


@dataclass
class GptqConfig(QuantGridConfig):
    act_order: bool = field(default=True, metadata=doc("quantize columns with the largest Hessian diagonal first"))
    percdamp: float = field(default=0.01, metadata=doc("Hessian damping, fraction of its mean diagonal"))
    block_size: int = field(default=128, metadata=doc("columns per lazy-update block"))
    true_sequential: bool = field(default=True, metadata=doc("quantize q/k/v, o, gate/up, down one after another"))
    max_blocks: int | None = field(default=None, metadata=doc("use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("calibration blocks per layer call"))
    awq: bool = field(default=False, metadata=doc("AWQ's scale and clipping search first, in the same calibration "
                                                   "run (quant.awq's defaults, this step's grid)"))
    awq_blocks: int | None = field(default=None, metadata=doc("AWQ's statistics from at most this many blocks "
                                                               "(whole batches; default all)"))

    def validate(self) -> None:
        self.validate_grid("quant.gptq")
        if self.awq_blocks is not None and (self.awq_blocks < 1 or not self.awq):
            raise ConfigError("quant.gptq: awq_blocks needs awq: true and must be at least 1")
        if self.percdamp < 0:
            raise ConfigError(f"quant.gptq: percdamp must be >= 0, got {self.percdamp}")
        if self.block_size < 1 or self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError("quant.gptq: block_size, batch_size and max_blocks must be at least 1")


def _hessians(shared: dict[tuple, list], stats: LayerStats) -> Iterator[torch.Tensor | HessianAccumulator]:
    """The Hessian of each group of `shared` (keys: accumulator id, grid): its accumulator itself
    for the last group reading it (GPTQ takes the running sum over in place: one [in, in] matrix
    instead of two), a finalized copy for any earlier one (Linears of one input on two grids)."""
    left: dict[int, int] = {}
    for acc_id, _ in shared:
        left[acc_id] = left.get(acc_id, 0) + 1
    for (acc_id, _), members in shared.items():
        left[acc_id] -= 1
        stat = stats[members[0][0].role]
        yield stat.hessian_acc if left[acc_id] == 0 and stat.hessian_acc is not None else stat.hessian()


def _gptq_stacked(modules: list[nn.Linear], hessian: torch.Tensor | HessianAccumulator, config: GptqConfig,
                  plan: GridPlan):  # fmt: skip
    """GPTQ of Linears that share one Hessian and one grid (q, k, v; gate, up), solved as one
    weight with their rows stacked: GPTQ treats rows independently, so this is the same result
    with one Cholesky and one column loop instead of one per Linear (the loop's per-column
    overhead is most of GPTQ's solve time on CPU). One dict per module, in order."""
    weights = [module.weight.data for module in modules]
    with solver_threads(weights[0].device):
        result = gptq_quantize(
            weights, hessian, plan.grid, block_size=config.block_size, percdamp=config.percdamp,
            act_order=config.act_order,
        )  # fmt: skip
    outs, start = [], 0
    for module in modules:
        weight, end = module.weight, start + module.out_features
        part = result.rows(start, end)
        weight.data.copy_(part.weight.to(weight.dtype))
        packed = packed_from(part.codes, part.scales, part.zeros, config, plan)
        outs.append({"loss": part.loss, "damp": part.damp, "packed": packed, "blocks": _exact_bytes(plan, part)})
        start = end
    return outs


def _exact_bytes(plan: GridPlan, result) -> GgufBlocks | None:
    """The file bytes of a weight on a GGUF grid the step does not store packed (all but q4_0 /
    q8_0): export writes them as they are. The K-quant grids' codes + super-block headers
    (result.stored) cannot be recovered from the dense values at all; the 32-weight blocks could
    be searched for, but the bytes are exact by construction."""
    if plan.type is None or plan.type in ("q4_0", "q8_0"):
        return None
    if plan.type in FORMATS:
        return GgufBlocks(plan.type, pack_blocks(result.codes, result.scales, result.zeros, plan.type))
    return GgufBlocks(plan.type, plan.grid.pack(result.codes, result.stored))


def _awq_phase(model: nn.Module, config: GptqConfig) -> tuple[AwqScaler | None, list[Phase]]:
    """AWQ as the first phase of every layer (kompakt.calib.Phase): it scales all of the layer's
    groups on their float weights, then GPTQ quantizes them, before the layer's outputs move on."""
    if not config.awq:
        return None, []
    grid = AwqConfig(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
                     format=config.format, tensor_types=config.tensor_types)  # fmt: skip
    grid.validate()
    scaler = AwqScaler(model, grid)
    batches = None if config.awq_blocks is None else -(-config.awq_blocks // config.batch_size)
    return scaler, [Phase(scaler.process, roles=all_roles(model), max_batches=batches, true_sequential=True)]  # as quant.awq


def _run_gptq(ctx: PassContext, blocks: torch.Tensor, decoder: list[Target], config: GptqConfig,
              types: dict[str, str]):  # fmt: skip
    model = ctx.loaded.model
    targets = {(t.layer, t.role): t for t in decoder}
    done = Quantized()
    losses: dict[str, float] = {}
    # A basis shared across layers (share.basis) is solved once, on its first layer. Weak: a streamed
    # model frees each layer's weights, and a freed tensor's id may be a later layer's.
    solved: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def process(index: int, layer: nn.Module, stats: LayerStats) -> None:
        shared: dict[tuple, list[tuple[Target, nn.Linear]]] = {}  # (accumulator, grid) -> its Linears
        for role, stat in stats.items():
            target = targets[(index, role)]
            plan = plan_grid(config, stat.module.in_features, types.get(target.name))
            done.plans[target.name] = plan
            weight = stat.module.weight
            if plan.grid is not None and solved.get(id(weight)) is not weight:
                solved[id(weight)] = weight
                shared.setdefault((id(stat.hessian_acc), plan.grid), []).append((target, stat.module))
        for members, hessian in zip(shared.values(), _hessians(shared, stats)):
            plan = done.plans[members[0][0].name]
            for (target, _), out in zip(members, _gptq_stacked([m for _, m in members], hessian, config, plan)):
                done.packed[target.name], losses[target.name] = out["packed"], out["loss"]
                if out["blocks"] is not None:
                    done.blocks[target.name] = out["blocks"]
                if out["damp"] != config.percdamp:
                    logger.warning("%s: GPTQ needed damping %.3g", target.name, out["damp"])

    def skip(index: int, layer: nn.Module, roles: list[str]) -> None:
        """A layer a killed streamed run finished (written already): its plans, as `process` makes them."""
        for role in roles:
            target = targets[(index, role)]
            done.plans[target.name] = plan_grid(config, target.module.in_features, types.get(target.name))

    awq, phases = _awq_phase(model, config)
    roles = sorted({t.role for t in decoder})
    result = run_sequential(
        model, blocks, [*phases, Phase(process, roles=roles, skip=skip)], collect="hessian",
        true_sequential=config.true_sequential, batch_size=config.batch_size,
        description="AWQ + GPTQ" if awq else "GPTQ", on_layer=layer_writer(ctx, done),
    )  # fmt: skip
    return done, losses, result, awq


def apply(ctx: PassContext, config: GptqConfig) -> PassReport:
    start = time.perf_counter()
    loaded = prepare(ctx, "quant.gptq", config)
    targets = select_targets(loaded.model, config, "quant.gptq")
    types = target_types(loaded.model, config, targets, "quant.gptq")
    decoder = [t for t in targets if t.layer is not None]
    blocks = ctx.calibration()[: config.max_blocks]
    quantized, losses, run, awq = _run_gptq(ctx, blocks, decoder, config, types)
    calib_seconds = run.seconds
    rest = [t for t in targets if t.layer is None]
    materialize_targets(ctx, [t.module for t in rest])  # streamed: the embeddings / head, when asked
    extra = rtn_targets(rest, config, types)
    quantized.update(extra)
    calibration = calibration_label(*blocks.shape) if isinstance(blocks, torch.Tensor) else (
        f"{batch_label(blocks)} (GPTQ Hessians)")  # padded sentences (an encoder)
    packed_layers = record(loaded, "gptq", config, quantized, types, calibration)
    done = quantized.plans
    notes = notes_of(done, "quant.gptq") + run.notes  # + experts calibrated on all tokens (MoE), and why
    worst = sorted(losses, key=losses.__getitem__, reverse=True)[:NAMES_SHOWN]
    details = {
        "method": "gptq", "grid": config.grid_label, "modules": len(done), "grids": grid_counts(config, done),
        "notes": notes, "act_order": config.act_order, "percdamp": config.percdamp,
        "true_sequential": config.true_sequential, "calibration_blocks": list(blocks.shape),
        "loss_total": sum(losses.values()), "largest_losses": {name: losses[name] for name in worst},
        "rtn_modules": sorted(extra.plans), "seconds": time.perf_counter() - start, "calibration_seconds": calib_seconds,
    }  # fmt: skip
    summary = summary_line("gptq", config, done, notes)
    if awq is not None:  # the step also did what a quant.awq step reports
        update_state(loaded, awq=AwqScaling(grid=config.grid_label, clip=awq.config.clip))
        details["awq"] = {"scales": scales_summary(awq.log), "notes": awq.notes,
                          "blocks": config.awq_blocks or int(blocks.shape[0])}  # fmt: skip
        summary += f"; awq first: {awq.summary()}"
    return PassReport(loaded=loaded, summary=summary, details=details, packed_layers=packed_layers)


PASS = PassSpec(name="quant.gptq", config=GptqConfig, apply=apply, needs_calibration=True, streams=True,
                doc=__doc__ or "")
