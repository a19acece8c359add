"""Routing-aware statistics of the experts of one MoE layer, for the sequential driver.

An expert sees only the tokens its router sends to it, so GPTQ's Hessian, SparseGPT's, Wanda's
column norms and AWQ's activation means of an expert are taken over those tokens alone: the
layer runs on the calibration inputs with a pre-hook on the fused experts module, which
receives the block input and the router's choices (hidden [T, H], top_k_index [T, k]); the
hook keeps them and stops the layer. Then, per expert e with routed rows X_e:

- gate / up (they read the same input): statistics of X_e;
- down: statistics of act(X_e W_gate^T) * (X_e W_up^T), computed with the expert's weights
  as they are now (true-sequential: after gate / up were changed, as GPTQ does for a dense MLP).

Starved experts, the stated rule: an expert routed fewer than `min_tokens` calibration tokens
(MIN_EXPERT_TOKENS by default) has too little data for a Hessian of its input width, so it is
calibrated on *all* tokens entering the layer's MoE block instead (its statistics as if every
token were routed to it; the gate/up input is then the same for all such experts). The driver
returns a note naming those experts and their routed counts, which the pass reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from kompakt.calib.capture import CapturedInputs, _StopForward
from kompakt.calib.stats import LinearStats, collect_kinds
from kompakt.model.arch import ArchSpec
from kompakt.model.moe import experts_module, parse_expert_role

MIN_EXPERT_TOKENS = 32  # fewer routed calibration tokens: the expert is calibrated on all tokens


@dataclass
class RoutedInputs:
    """The MoE block's inputs and routing of every calibration batch (padding left out)."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # [tokens, H] per batch
    chosen: list[torch.Tensor] = field(default_factory=list)  # [tokens, k] per batch

    def counts(self, n_experts: int) -> torch.Tensor:
        """Routed tokens per expert over all batches [E]."""
        total = torch.zeros(n_experts, dtype=torch.long)
        for chosen in self.chosen:
            total += torch.bincount(chosen.reshape(-1).cpu(), minlength=n_experts)[:n_experts]
        return total

    @property
    def tokens(self) -> int:
        return sum(int(h.shape[0]) for h in self.hidden)


@torch.no_grad()
def capture_routed(layer: nn.Module, index: int, captured: CapturedInputs, inputs: list[torch.Tensor],
                   spec: ArchSpec) -> RoutedInputs:  # fmt: skip
    """Run `layer` on every batch up to its experts; keep what the experts module receives."""
    routed = RoutedInputs()
    mask: list[torch.Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args) + [kwargs[k] for k in ("top_k_index",) if k in kwargs]
        hidden, chosen = values[0], values[1]
        if mask[0] is not None and mask[0].numel() == hidden.shape[0]:
            hidden, chosen = hidden[mask[0]], chosen[mask[0]]
        routed.hidden.append(hidden.detach().float())
        routed.chosen.append(chosen.detach())
        raise _StopForward

    handle = experts_module(layer, spec.moe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch, states in enumerate(inputs):
            batch_mask = captured.mask(batch)
            mask[0] = None if batch_mask is None else batch_mask.reshape(-1).bool()
            call = captured.call_for(index, states, batch)
            try:
                layer(states, *call.args, **call.kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return routed


@torch.no_grad()
def collect_expert_stats(
    layer: nn.Module,
    index: int,
    captured: CapturedInputs,
    inputs: list[torch.Tensor],
    spec: ArchSpec,
    modules: dict[str, nn.Linear],
    *,
    collect: str | Iterable[str] = "hessian",
    hessian_dtype: torch.dtype = torch.float32,
    min_tokens: int | None = None,
) -> tuple[dict[str, LinearStats], list[str]]:
    """Statistics of the expert Linears `modules` (role "mlp.experts.<e>.<part>" -> view Linear,
    kompakt.model.moe.expert_linear_modules) over their routed tokens; (stats, notes).
    `min_tokens`: the starvation threshold (default MIN_EXPERT_TOKENS)."""
    min_tokens = MIN_EXPERT_TOKENS if min_tokens is None else min_tokens
    kinds = collect_kinds(collect)
    routed = capture_routed(layer, index, captured, inputs, spec)
    n_experts = int(getattr(experts_module(layer, spec.moe), spec.moe.gate_up).shape[0])
    counts = routed.counts(n_experts)
    by_expert: dict[int, dict[str, nn.Linear]] = {}
    for role, module in modules.items():
        expert, part = parse_expert_role(role)
        by_expert.setdefault(expert, {})[part] = module
    starved = sorted(e for e in by_expert if int(counts[e]) < min_tokens)
    act = experts_module(layer, spec.moe).act_fn
    stats: dict[str, LinearStats] = {}
    shared_input: LinearStats | None = None  # all tokens: the gate/up input of every starved expert
    for expert, parts in sorted(by_expert.items()):
        rows = [h if expert in starved else h[(c == expert).any(-1)] for h, c in zip(routed.hidden, routed.chosen)]
        input_roles = [p for p in ("gate", "up") if p in parts]
        if input_roles:
            first = f"mlp.experts.{expert}.{input_roles[0]}"
            if expert in starved and shared_input is not None:
                stats[first] = shared_input.alias(first, parts[input_roles[0]])
            else:
                stats[first] = _accumulate(first, parts[input_roles[0]], rows, kinds, hessian_dtype)
                if expert in starved:
                    shared_input = stats[first]
            for part in input_roles[1:]:  # up reads gate's input: one accumulation
                role = f"mlp.experts.{expert}.{part}"
                stats[role] = stats[first].alias(role, parts[part])
        if "down" in parts:
            gate, up = _gate_up_weights(layer, spec, expert)
            hidden = [act(x @ gate.T) * (x @ up.T) for x in rows]
            role = f"mlp.experts.{expert}.down"
            stats[role] = _accumulate(role, parts["down"], hidden, kinds, hessian_dtype)
    notes = []
    if starved:
        listed = ", ".join(f"{e} ({int(counts[e])} tokens)" for e in starved)
        notes.append(f"layer {index}: experts {listed} were routed fewer than {min_tokens} of {routed.tokens} "
                     "calibration tokens: calibrated on all tokens of the layer")  # fmt: skip
    return stats, notes


def _gate_up_weights(layer: nn.Module, spec: ArchSpec, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    fused = getattr(experts_module(layer, spec.moe), spec.moe.gate_up)[expert].float()  # [2I, H]
    width = fused.shape[0] // 2
    return fused[:width], fused[width:]


def _accumulate(role: str, module: nn.Linear, rows: list[torch.Tensor], kinds, hessian_dtype) -> LinearStats:
    stat = LinearStats.create(role, module, kinds, hessian_dtype)
    for x in rows:
        if x.shape[0]:
            stat.add(x.unsqueeze(0))
    if stat.sq_sum is None:  # an expert no batch reached (only with min_tokens 0)
        stat.add(torch.zeros(1, 1, module.in_features, device=module.weight.device))
    return stat
