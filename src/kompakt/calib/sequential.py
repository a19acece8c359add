"""The layer-by-layer (sequential) calibration driver shared by SparseGPT, Wanda, GPTQ and AWQ.

The model is never run whole on the calibration set. Layer 0's inputs are captured once
(`kompakt.calib.capture`); then, for each decoder layer in order:

1. hooks on the layer's Linears accumulate input statistics (Hessian, column norms, raw
   inputs) while the layer runs alone on all calibration inputs;
2. `process(layer_index, layer, stats)` — the pass — changes the layer's weights in place;
3. the (changed) layer runs again and its outputs become the next layer's inputs, so every
   layer is calibrated on what the already-compressed layers before it produce (as in the
   SparseGPT / GPTQ reference code).

True-sequential (the default, GPTQ's `--true-sequential`): within a layer the Linears are
processed in the order data flows through them — {q, k, v} (or fused qkv), then o, then
{gate, up} (or fused gate_up), then down — and the statistics of each group are gathered by
running the layer *after* the earlier groups were changed, so o_proj is fitted to the outputs
of the already-pruned q/k/v. A group's pass stops the layer as soon as every Linear of the
group has seen its input (hooks raise a stop signal), so the extra runs cost less than a full
layer each. With `true_sequential=False` all Linears are processed together from the layer's
inputs (one statistics run per layer; Wanda's reference behaviour).

Mixture of Experts: when `roles` names expert roles ("mlp.experts.<e>.<part>",
kompakt.model.moe.all_roles), the experts come after the layer's other groups, gate/up of every
expert then down, with statistics over each expert's routed tokens (kompakt.calib.experts);
experts starved of tokens are calibrated on all tokens, and `SequentialResult.notes` says so.

Linears that receive the very same tensor (q, k, v after one norm; gate and up) share one
accumulation of their statistics. Several `Phase`s may run per layer before its outputs move on
(AWQ scaling every group, then GPTQ quantizing them: one capture and one propagation for both).
The layer runs reuse the attention's and MLP's inner results while only their last Linear changed
(`kompakt.calib.layer_cache`: checked, bit-identical), so a GPTQ layer computes its attention once
per batch and its gate/up once, not four and three times.

Streaming (a model opened with kompakt.model.lazy, larger than memory): only the embeddings are
materialised for the capture, then each layer is materialised before its statistics run and,
after its outputs moved on and `on_layer(index, layer)` (the step's writer) stored it, released
back to the meta device. The math is the same code on the same tensors, so the weights are the
in-memory path's bit for bit; at most one decoder layer is materialised at a time. With the
lazy model's `spill_dir` set, the activations between layers live on disk (kompakt.calib.spill)
and the layer caches are off (recomputed, same results). A streamed model whose `device` is a GPU
(`--device cuda`) onloads each layer there as it is materialised, as llm-compressor's sequential
pipeline does: the embeddings capture layer 0's inputs on the CPU, then the activations, the
statistics and the solvers live on the GPU (in VRAM, never spilled), and only the finished layer's
stored tensors come back to the CPU to be written.

Memory: one layer's inputs and outputs, n × len × hidden each (128 × 512 × 576 fp32 ≈ 150 MB
for SmolLM2-135M), the layer caches (about 5 × that), plus the statistics of one group (an
in × in Hessian per Linear).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kompakt.calib.capture import CapturedInputs, _StopForward, capture_layer_inputs, layer_output, run_layer
from kompakt.calib.experts import collect_expert_stats
from kompakt.calib.groups import SEQUENTIAL_GROUPS, sequential_groups
from kompakt.calib.layer_cache import LayerCaches
from kompakt.calib.resume import resume_start, skip_layer
from kompakt.calib.spill import SpilledBatches, propagate, spill
from kompakt.calib.stats import LinearStats, collect_kinds
from kompakt.model.arch import ArchSpec, arch_for, decoder_layers, linear_modules
from kompakt.model.inputs import Batch
from kompakt.model.lazy import lazy_of
from kompakt.model.moe import expert_linear_modules, parse_expert_role
from kompakt.model.stream_resume import side
from kompakt.process_memory import return_freed_memory

logger = logging.getLogger(__name__)

__all__ = ["SEQUENTIAL_GROUPS", "LayerStats", "Phase", "SequentialResult", "collect_stats", "run_sequential",
           "sequential_groups"]


@dataclass
class LayerStats:
    """What `process` receives for one group of Linears of one decoder layer.

    Behaves like a read-only dict role -> LinearStats (`stats["mlp.down"].hessian()`).

    Attributes:
        index: the decoder layer's index.
        layer: the decoder layer (its Linears are `stats[role].module`).
        linears: role -> statistics of that Linear's inputs, for the roles of this group.
        group_index: position of this group within the layer (0 = first).
        n_groups: number of groups in this layer (`group_index == n_groups - 1` is the last).
        inputs: the hidden states entering this layer, one tensor [batch, len, hidden] per
            calibration batch (outputs of the already-processed layers before it).
    """

    index: int
    layer: nn.Module
    linears: dict[str, LinearStats]
    group_index: int
    n_groups: int
    inputs: list[torch.Tensor]
    _captured: CapturedInputs = field(repr=False)

    def __getitem__(self, role: str) -> LinearStats:
        return self.linears[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)

    def __contains__(self, role: object) -> bool:
        return role in self.linears

    def items(self):
        return self.linears.items()

    def keys(self):
        return self.linears.keys()

    def values(self):
        return self.linears.values()

    def forward(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run this layer as it is now on `inputs` (default: its calibration inputs); outputs per
        batch. For passes that search by trying (AWQ's scale search)."""
        return run_layer(self.layer, self.index, self._captured, self.inputs if inputs is None else inputs)


ProcessFn = Callable[[int, nn.Module, LayerStats], None]
LayerDoneFn = Callable[[int, nn.Module], None]
SkipFn = Callable[[int, nn.Module, list[str]], None]


@dataclass(frozen=True)
class Phase:
    """One sweep over a layer's groups, several of which run per layer before its outputs move on.

    AWQ before GPTQ in one step is two phases: AWQ scales every group of the layer on its float
    weights, then GPTQ quantizes them group by group; the layer's inputs are captured and its
    outputs propagated once for both.

    Attributes:
        process: called once per group, as `run_sequential`'s `process`.
        roles: the Linear roles of this phase (None: the driver's `roles`).
        max_batches: statistics from at most this many calibration batches (None: all).
        true_sequential: this phase's grouping (None: the driver's `true_sequential`).
        skip: `skip(index, layer, roles)` for a layer a killed run already finished (its roles in
            the order `process` would have seen them): record what the pass keeps of it. Without
            it a resumed streamed step restarts from layer 0 (kompakt.model.stream_resume).
    """

    process: ProcessFn
    roles: Sequence[str] | None = None
    max_batches: int | None = None
    true_sequential: bool | None = None
    skip: SkipFn | None = None


@dataclass
class SequentialResult:
    """outputs: the last decoder layer's outputs per batch (before the final norm);
    n_samples: calibration rows; seconds: wall time of the whole run."""

    outputs: list[torch.Tensor]
    n_samples: int
    seconds: float
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def collect_stats(
    layer: nn.Module,
    index: int,
    captured: CapturedInputs,
    inputs: list[torch.Tensor],
    modules: dict[str, nn.Linear],
    *,
    collect: str | Iterable[str] = "hessian",
    hessian_dtype: torch.dtype = torch.float32,
    caches: LayerCaches | None = None,
) -> dict[str, LinearStats]:
    """Run `layer` on every batch of `inputs` with pre-hooks on `modules` accumulating their inputs.

    Each batch stops as soon as every module has seen its input (no wasted compute after).
    Linears that receive the very same tensor (q, k, v of one pre-norm; gate and up) share one
    accumulation (`LinearStats.alias`): their Hessians are equal, so it is computed once. Which
    ones do is found on the first batch; from the second on a batch stops at the first Linear's
    input (q and k, or gate, are not computed for nothing: a third of a layer's Linear work).
    `caches`: the layer's caches (kompakt.calib.layer_cache), told which batch runs.
    """
    kinds = collect_kinds(collect)
    stats = {role: LinearStats.create(role, module, kinds, hessian_dtype) for role, module in modules.items()}
    seen: dict[str, torch.Tensor] = {}  # role -> its input in the batch being run
    alias: dict[str, str] = {}  # role -> the role whose statistics it shares
    first = [True]
    owners: list[str] = []
    mask: list[torch.Tensor | None] = [None]  # the running batch's real tokens (padding left out)

    def make_hook(role: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            source = next((r for r, t in seen.items() if t is x), None)
            if first[0] and source is not None:
                alias[role] = source
            if alias.get(role) != source:
                raise RuntimeError(f"{role} shares its input with {source} in one batch only")
            if source is None:
                stats[role].add(x, mask[0])
            seen[role] = x
            if len(seen) == len(stats) or (not first[0] and all(r in seen for r in owners)):
                raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(make_hook(role)) for role, module in modules.items()]
    if caches is not None:
        caches.observe(modules.values())
    try:
        for batch, states in enumerate(inputs):
            seen.clear()
            mask[0] = captured.mask(batch)
            if caches is not None:
                caches.batch(batch)
            call = captured.call_for(index, states, batch)
            try:
                layer(states, *call.args, **call.kwargs)
            except _StopForward:
                pass
            if first[0]:
                owners.extend(role for role in stats if role not in alias)  # the roles with their own statistics
            first[0] = False
    finally:
        for handle in handles:
            handle.remove()
        if caches is not None:
            caches.observe(())
    for role, source in alias.items():
        stats[role] = stats[source].alias(role, modules[role])
    return stats


@dataclass
class _Run:
    """One phase on one layer: its groups' statistics and `process` calls."""

    spec: ArchSpec
    index: int
    layer: nn.Module
    captured: CapturedInputs
    inputs: Sequence[torch.Tensor]
    caches: LayerCaches | None
    collect: str | Iterable[str]
    hessian_dtype: torch.dtype
    trim: bool = False  # return freed memory around every group (a streamed model: RAM is the limit)
    notes: list[str] = field(default_factory=list)

    def _trim(self) -> None:
        if self.trim:
            return_freed_memory()

    def groups(self, roles: Sequence[str] | None, true_sequential: bool, process: ProcessFn) -> None:
        linears = linear_modules(self.layer, self.spec)
        selected = [role for role in linears if roles is None or role in roles]
        groups = sequential_groups(selected, true_sequential)
        experts = self._expert_groups(roles, true_sequential)
        n_groups = len(groups) + len(experts)
        for group_index, group in enumerate(groups):
            modules = {role: linears[role] for role in group}
            stats = collect_stats(self.layer, self.index, self.captured, self.inputs, modules, collect=self.collect,
                                  hessian_dtype=self.hessian_dtype, caches=self.caches)  # fmt: skip
            self._trim()  # the statistics run's temporaries, before the solver's copies
            process(self.index, self.layer, LayerStats(self.index, self.layer, stats, group_index, n_groups,
                                                       self.inputs, self.captured))  # fmt: skip
            del stats
            self._trim()  # the group's Hessians and solver copies: back to the system before the next
        for group_index, modules in enumerate(experts, start=len(groups)):
            stats, notes = collect_expert_stats(self.layer, self.index, self.captured, self.inputs, self.spec,
                                                modules, collect=self.collect, hessian_dtype=self.hessian_dtype)  # fmt: skip
            self.notes.extend(note for note in notes if note not in self.notes)
            process(self.index, self.layer, LayerStats(self.index, self.layer, stats, group_index, n_groups,
                                                       self.inputs, self.captured))  # fmt: skip

    def _expert_groups(self, roles: Sequence[str] | None, true_sequential: bool) -> list[dict[str, nn.Linear]]:
        """The experts' Linears (MoE families) selected by `roles`: gate/up of every expert, then
        down (one group when not true-sequential); their statistics are routing-aware."""
        if self.spec.moe is None:
            return []
        views = expert_linear_modules(self.layer, self.spec.moe)
        chosen = {role: m for role, m in views.items() if roles is not None and role in roles}  # opt-in: named roles
        first = {r: m for r, m in chosen.items() if parse_expert_role(r)[1] != "down"}
        second = {r: m for r, m in chosen.items() if parse_expert_role(r)[1] == "down"}
        groups = [first, second] if true_sequential else [chosen]
        return [group for group in groups if group]


def _progress(description: str, total: int):
    from rich.progress import Progress

    progress = Progress(transient=True, disable=not sys.stderr.isatty())
    return progress, progress.add_task(description, total=total)


def run_sequential(
    model: nn.Module,
    blocks: Batch,
    process: ProcessFn | Sequence[Phase],
    *,
    roles: Sequence[str] | None = None,
    collect: str | Iterable[str] = "hessian",
    true_sequential: bool = True,
    batch_size: int = 8,
    hessian_dtype: torch.dtype = torch.float32,
    description: str = "calibrating layers",
    on_layer: LayerDoneFn | None = None,
    only_layers: Collection[int] | None = None,
) -> SequentialResult:
    """Calibrate `model` layer by layer on token `blocks` [n, len], calling `process` per group.

    Args:
        model: a transformers causal LM of a family in the arch table (changed in place by `process`).
        blocks: calibration token ids [n_blocks, block_len], or padded sentences (an encoder's
            kompakt.model.inputs.SentenceBatch: statistics leave the padding out).
        process: `process(layer_index, layer, stats)`; changes the Linears in `stats` in place.
            Called once per group (see `sequential_groups`) that has at least one selected role.
            Or several `Phase`s, run one after another on every layer.
        roles: the Linear roles to collect and hand to `process` (default every Linear of the
            layer: "attn.q", ..., "mlp.down"); roles a family lacks are ignored.
        collect: "hessian", "norms" or "inputs", or several (norms are always collected).
        true_sequential: process groups in data-flow order, re-running the layer in between.
        batch_size: calibration rows per layer call.
        hessian_dtype: float32 (default) or float64 accumulation of the Hessian.
        description: the progress bar's label.
        on_layer: `on_layer(index, layer)` once a layer is processed and its outputs propagated
            (a streamed step writes the layer there; it is released to meta right after).
        only_layers: calibrate only these layer indices: the others are run forward without
            statistics, and the driver stops after the last of them (a pass whose targets are a
            few layers does not pay for the rest); a streamed model still visits every layer.

    Returns:
        The last layer's outputs on the calibration data, sample count, wall time.
    """
    start = time.perf_counter()
    spec = arch_for(model)
    layers = decoder_layers(model)
    phases = [Phase(process)] if callable(process) else list(process)
    lazy = lazy_of(model)
    if lazy is not None:  # streamed: the embeddings alone bring the blocks to layer 0
        lazy.materialize(spec.embed, lazy.compute_dtype)
    notes: list[str] = []
    captured = capture_layer_inputs(model, blocks, batch_size=batch_size)
    n_samples = captured.n_samples
    onload = _onload_device(lazy)
    if lazy is not None:
        lazy.release(spec.embed)
    if onload is not None:  # a GPU: the activations live in its memory, not on disk
        captured = captured.to(onload)
    spill_dir = lazy.spill_dir if lazy is not None and onload is None else None
    resume = lazy.resume if lazy is not None else None
    first = resume_start(resume, phases, spec)
    inputs: Sequence[torch.Tensor] = captured.hidden
    if first:  # a killed run finished layers 0 .. first - 1: layer `first`'s inputs are on disk
        inputs, captured.hidden = SpilledBatches(resume.inputs_of(first), range(len(captured.hidden))), []
        if onload is not None:
            inputs = [hidden.to(onload) for hidden in inputs]
        notes.append(f"resumed: layers 0-{first - 1} were finished by an earlier run")
    elif spill_dir is not None:  # activations on disk (kompakt.calib.spill)
        inputs, captured.hidden = spill(captured.hidden, spill_dir / "a"), []
    verified: dict[type, int] = {}
    wanted = set(range(len(layers))) if only_layers is None else set(only_layers)
    last = len(layers) - 1 if lazy is not None or not wanted else max(wanted)
    progress, task = _progress(description, last + 1)
    with progress:
        for index, layer in enumerate(layers[: last + 1]):
            if index < first:
                if index in wanted:
                    skip_layer(spec, index, layer, phases, roles, true_sequential)
                progress.advance(task)
                continue
            if lazy is not None:
                lazy.onload(layer)
            caches = None if spill_dir is not None else LayerCaches(layer, spec, verified)
            with caches.installed() if caches is not None else nullcontext():
                for phase in phases if index in wanted else ():
                    run = _Run(spec, index, layer, captured, inputs[: phase.max_batches], caches, collect, hessian_dtype,
                               trim=lazy is not None)  # fmt: skip
                    grouping = true_sequential if phase.true_sequential is None else phase.true_sequential
                    run.groups(phase.roles if phase.roles is not None else roles, grouping, phase.process)
                    notes.extend(note for note in run.notes if note not in notes)
                inputs = _propagate(layer, index, captured, inputs, caches, spill_dir)  # the next layer's inputs
            if resume is not None and spill_dir is None:  # a copy on disk, for a run resumed after this layer
                spill(inputs, resume.activations / side(index))
            if on_layer is not None:
                on_layer(index, layer)
            if lazy is not None:
                lazy.release(layer)
            return_freed_memory()  # once per layer (about 20 ms; per group only when streamed, see _Run.trim)
            logger.debug("layer %d calibrated", index)
            progress.advance(task)
    outputs = [hidden.cpu() for hidden in inputs] if onload is not None else list(inputs)
    return SequentialResult(outputs=outputs, n_samples=n_samples, seconds=time.perf_counter() - start, notes=notes)


def _onload_device(lazy) -> torch.device | None:
    """The GPU (or MPS) a streamed model's layers are onloaded to; None: where the model is."""
    if lazy is None or lazy.device.type == "cpu":
        return None
    return lazy.device


def _propagate(layer: nn.Module, index: int, captured: CapturedInputs, inputs: Sequence[torch.Tensor],
               caches: LayerCaches | None, spill_dir: Path | None) -> Sequence[torch.Tensor]:  # fmt: skip
    """The layer's outputs per batch: in RAM, or written batch by batch to the other of two
    spill directories (its inputs are read from the one this layer's index points at)."""
    if spill_dir is None:
        return run_layer(layer, index, captured, list(inputs), caches.batch if caches is not None else None)

    def one(batch: int, hidden: torch.Tensor) -> torch.Tensor:
        call = captured.call_for(index, hidden, batch)
        return layer_output(layer(hidden, *call.args, **call.kwargs))

    return propagate(one, inputs, spill_dir / side(index))
