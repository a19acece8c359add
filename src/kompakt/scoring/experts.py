"""Per-expert routing statistics of a Mixture-of-Experts model: what `kompakt analyze` shows and
what moe.prune ranks experts by.

Per layer, over the calibration tokens (padding left out):

- frequency[e]: how many tokens the router sends to expert e (top-k choices); `share` divides
  by the tokens, so the shares of a layer sum to top-k.
- reap[e]: REAP saliency (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for
  One-Shot MoE Compression", eq. 9): the mean over the tokens routed to e of
  g_e(x) * ||f_e(x)||_2, with g_e(x) the router's softmax probability of e and f_e(x) the
  expert's output. As in the reference implementation (CerebrasResearch/reap, observer.py),
  g is the softmax over all experts, optionally renormalised over the chosen top-k
  (`renormalize=True`). An expert no token reaches scores 0.
- output_norm[e]: the mean ||f_e(x)||_2 over its routed tokens (REAP without the gate; "EAN").
- gate_mean[e]: the mean of g_e(x) over its routed tokens.
- token_entropy: the mean over tokens of the entropy (nats) of the router's softmax: low when
  the router is sure; log(E) for a uniform router.
- load_entropy: the entropy of the layer's expert shares normalised by log(E): 1.0 when every
  expert gets the same load, lower when a few experts take most tokens.

The hook sits on each layer's router (its input is the block's input; its output the logits
and the chosen experts), and recomputes the chosen experts' outputs from the fused weights
(kompakt.model.moe.expert_forward), so it works whichever experts implementation
transformers dispatches to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kompakt.errors import DataError
from kompakt.model.arch import decoder_layers
from kompakt.model.inputs import Batch, token_mask
from kompakt.model.moe import expert_forward, moe_spec, require_all_sparse, router_module, top_k
from kompakt.scoring.hooks import forward_with_hooks


@dataclass
class ExpertStats:
    """Routing statistics per MoE layer (lists indexed by layer, arrays by expert)."""

    tokens: list[int]
    frequency: list[np.ndarray]
    reap: list[np.ndarray]
    output_norm: list[np.ndarray]
    gate_mean: list[np.ndarray]
    token_entropy: list[float]
    top_k: int
    renormalized: bool = False
    load_entropy: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.load_entropy:
            self.load_entropy = [_load_entropy(f) for f in self.frequency]

    @property
    def share(self) -> list[np.ndarray]:
        """Per layer, the fraction of tokens routed to each expert (sums to top-k)."""
        return [f / max(1, t) for f, t in zip(self.frequency, self.tokens)]

    def to_dict(self) -> dict:
        arrays = {key: [np.asarray(row).tolist() for row in getattr(self, key)]
                  for key in ("frequency", "reap", "output_norm", "gate_mean")}  # fmt: skip
        return {"tokens": self.tokens, "token_entropy": self.token_entropy, "load_entropy": self.load_entropy,
                "top_k": self.top_k, "renormalized": self.renormalized, **arrays}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> ExpertStats:
        arrays = {key: [np.asarray(row, dtype=np.float64) for row in data[key]]
                  for key in ("frequency", "reap", "output_norm", "gate_mean")}  # fmt: skip
        return cls(tokens=list(data["tokens"]), token_entropy=list(data["token_entropy"]), top_k=int(data["top_k"]),
                   renormalized=bool(data.get("renormalized", False)), load_entropy=list(data.get("load_entropy", [])),
                   **arrays)  # fmt: skip


def _load_entropy(frequency: np.ndarray) -> float:
    total = float(np.sum(frequency))
    if total <= 0 or len(frequency) < 2:
        return 0.0
    p = np.asarray(frequency, dtype=np.float64) / total
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(len(frequency)))


class ExpertCollector:
    """Router forward hooks that accumulate per-expert sums over calibration batches."""

    def __init__(self, model: nn.Module, renormalize: bool = False) -> None:
        self.spec = moe_spec(model)
        require_all_sparse(model)  # a dense layer (Qwen's mlp_only_layers) has no router to hook
        self.layers = decoder_layers(model)
        self.renormalize = renormalize
        n = len(self.layers)
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        self.tokens = [0] * n
        self.entropy = [0.0] * n
        self.mask: torch.Tensor | None = None  # the running batch's real tokens, flattened [b * seq]

    def before(self, batch: Batch) -> None:
        mask = token_mask(batch)
        self.mask = None if mask is None else mask.reshape(-1).bool()

    def attach(self) -> list:
        return [router_module(layer, self.spec).register_forward_hook(self._hook(i))
                for i, layer in enumerate(self.layers)]  # fmt: skip

    def _hook(self, index: int) -> Callable:
        def hook(module, args, output) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            logits, chosen = output[0], output[2]
            if self.mask is not None and self.mask.numel() == x.shape[0]:
                x, logits, chosen = x[self.mask], logits[self.mask], chosen[self.mask]
            self._accumulate(index, x, logits.float(), chosen)

        return hook

    def _accumulate(self, index: int, x: torch.Tensor, logits: torch.Tensor, chosen: torch.Tensor) -> None:
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        n_experts = probs.shape[1]
        self.tokens[index] += int(x.shape[0])
        self.entropy[index] += float(-(probs * torch.log(probs.clamp_min(1e-30))).sum())
        if self.renormalize:
            probs = probs / probs.gather(1, chosen).sum(-1, keepdim=True)
        sums = self.sums[index]
        zeros = torch.zeros(n_experts, dtype=torch.float64)
        for key in ("frequency", "reap", "norm", "gate"):
            sums.setdefault(key, zeros.clone())
        layer = self.layers[index]
        for expert in range(n_experts):
            rows = (chosen == expert).any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            norms = expert_forward(layer, self.spec, expert, x[rows]).float().norm(dim=-1).double()
            gates = probs[rows, expert].double()
            sums["frequency"][expert] += rows.numel()
            sums["reap"][expert] += float((gates * norms).sum())
            sums["norm"][expert] += float(norms.sum())
            sums["gate"][expert] += float(gates.sum())

    def result(self, top_k: int) -> ExpertStats:
        def mean(key: str, sums: dict) -> np.ndarray:
            return (sums[key] / sums["frequency"].clamp(min=1)).numpy()

        return ExpertStats(
            tokens=self.tokens,
            frequency=[s["frequency"].numpy() for s in self.sums],
            reap=[mean("reap", s) for s in self.sums],
            output_norm=[mean("norm", s) for s in self.sums],
            gate_mean=[mean("gate", s) for s in self.sums],
            token_entropy=[e / max(1, t) for e, t in zip(self.entropy, self.tokens)],
            top_k=top_k,
            renormalized=self.renormalize,
        )


def expert_stats(model: nn.Module, batches: Iterable[Batch], renormalize: bool = False) -> ExpertStats:
    """Routing frequency, REAP saliency, output norms and routing entropy of every MoE layer of
    `model` over calibration `batches` ([batch, seq] ids, or padded with their mask)."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    collector = ExpertCollector(model, renormalize)
    forward_with_hooks(model, batches, collector.attach(), collector.before)
    if not all(collector.sums):
        raise DataError("no calibration tokens reached the MoE routers; give calibration text with some tokens")
    return collector.result(top_k(model))


# --------------------------------------------------------------------------- expert channels


@dataclass
class ExpertChannels:
    """Per layer: experts [E][I] (the mean |act(gate x) * up x| of each expert channel over the
    tokens routed to that expert) and shared [I_shared] (over all tokens; None without one)."""

    experts: list[list[np.ndarray]]
    shared: list[np.ndarray | None]


def expert_channel_importance(model: nn.Module, batches: Iterable[Batch]) -> ExpertChannels:
    """Minitron's MLP-channel importance (|input of down_proj|) for every expert, each over its
    routed tokens: an expert's channel matters as much as it fires on the tokens it serves.
    (A mean over routed tokens, not Minitron's per-sample mean then RMS: an expert sees a
    varying, often empty, share of each sample.) Padding is left out."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    collector = ExpertCollector(model)
    spec = collector.spec
    n = len(collector.layers)
    sums: list[dict] = [{} for _ in range(n)]

    def hook_for(index: int):
        def hook(module, args, output) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            chosen = output[2]
            if collector.mask is not None and collector.mask.numel() == x.shape[0]:
                x, chosen = x[collector.mask], chosen[collector.mask]
            layer = collector.layers[index]
            for expert in range(int(output[0].shape[-1])):
                rows = x[(chosen == expert).any(-1)]
                _add(sums[index], ("expert", expert), _expert_hidden(layer, spec, expert, rows))
            if spec.shared_expert is not None:
                shared = layer.get_submodule(spec.shared_expert)
                _add(sums[index], ("shared",), shared.act_fn(shared.gate_proj(x)) * shared.up_proj(x))

        return hook

    handles = [router_module(layer, spec).register_forward_hook(hook_for(i)) for i, layer in enumerate(collector.layers)]
    forward_with_hooks(model, batches, handles, collector.before)
    n_experts = int(getattr(router_module(collector.layers[0], spec), "weight").shape[0])
    return ExpertChannels(
        experts=[[_mean(s, ("expert", e)) for e in range(n_experts)] for s in sums],
        shared=[_mean(s, ("shared",)) if spec.shared_expert else None for s in sums],
    )


def _expert_hidden(layer: nn.Module, spec, expert: int, x: torch.Tensor) -> torch.Tensor:
    fused = getattr(layer.get_submodule(spec.experts), spec.gate_up)[expert]  # [2I, H]
    width = fused.shape[0] // 2
    act = layer.get_submodule(spec.experts).act_fn
    x = x.to(fused.dtype)
    return act(x @ fused[:width].T) * (x @ fused[width:].T)


def _add(sums: dict, key: tuple, hidden: torch.Tensor) -> None:
    total, count = sums.get(key, (torch.zeros(hidden.shape[-1], dtype=torch.float64), 0))
    sums[key] = (total + hidden.detach().abs().double().sum(0).cpu(), count + int(hidden.shape[0]))


def _mean(sums: dict, key: tuple) -> np.ndarray:
    total, count = sums[key]
    return (total / max(1, count)).numpy()
