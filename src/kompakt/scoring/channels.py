"""Activation-based importance of MLP channels, attention heads and hidden channels (Minitron).

Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"
(Minitron), score every prunable unit by the activations it produces on calibration text, in
forward passes only:

    F_neuron(i) = agg_{B,S} |X W1_i^T|       (MLP channel i: its intermediate activation)
    F_head(i)   = agg_{B,S} ||Attn_i(X)||_2  (head i: the L2 norm of its attention output)
    F_emb(i)    = agg_{B,S} |LN(X)_i|        (hidden channel i: the norm outputs)

where agg_{B,S} aggregates over the batch (B) and sequence (S) dimensions: the paper writes a
sum, compares aggregation functions per dimension, and recommends (batch = L2, seq = mean) for
the width axes. NVIDIA's reference implementation (TensorRT Model Optimizer's Minitron pruning)
computes exactly that: per calibration sample, the mean of |activation| over the sequence; then
the L2 norm of those per-sample values over the samples. That is the definition here. The
sequence mean is taken first because positions are not aligned across samples (position 17 of
one text and of another are unrelated tokens), so a sample's mean is the meaningful unit; the
L2 over samples then lets samples with large activations weigh more. The absolute value keeps
positive and negative activations of a channel from cancelling in the mean. (An "L2 over the
sequence, mean over the batch" reading, which kompakt's analysis used before, swaps the two
aggregations the paper names.)

Units, as seen by forward hooks:
- MLP channel j of layer i: |input of down_proj|[..., j] (= act(gate) * up).
- Attention head h: the head's slice of the input of o_proj (head_dim values) -> L2 norm per
  position.
- KV group g (GQA): the sum of the importances of the query heads that share KV head g (query
  heads g * n_rep .. (g + 1) * n_rep - 1, the order `repeat_kv` uses); pruning a KV head removes
  all of them.
- Hidden channel j: |output of every pre-attention and pre-MLP norm|[..., j], each norm scored
  on its own, summed over the norms of all layers (the hidden size is shared by all of them).

Padded sentences (an encoder's calibration form): the sequence mean runs over a sentence's real
tokens only, never its padding.

The L2 over samples is divided by sqrt(number of samples) (a root mean square): the ranking is
the paper's, and the numbers do not grow with the calibration size, so the analysis can show
the same number the pass ranks by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from kompakt.model.arch import arch_for, get_submodule, norm_modules, text_config
from kompakt.model.inputs import Batch, token_mask
from kompakt.scoring.hooks import forward_with_hooks

AGGREGATION = "Minitron (batch=L2, seq=mean): mean over a block's positions, then RMS over calibration blocks"


@dataclass
class ChannelImportance:
    """Per decoder layer: mlp [intermediate], heads [n_heads], kv_groups [n_kv_heads]; hidden [hidden_size]."""

    mlp: list[np.ndarray]
    heads: list[np.ndarray]
    kv_groups: list[np.ndarray]
    hidden: np.ndarray | None = None
    aggregation: str = AGGREGATION

    @classmethod
    def from_heads(cls, mlp: list, heads: list, hidden, n_kv: int, aggregation: str = AGGREGATION) -> ChannelImportance:
        """Build from per-head scores; each KV group scores the sum of its query heads."""
        mlp = [np.asarray(row, dtype=np.float64) for row in mlp]
        heads = [np.asarray(row, dtype=np.float64) for row in heads]
        kv_groups = [row.reshape(n_kv, -1).sum(-1) for row in heads]
        hidden = None if hidden is None else np.asarray(hidden, dtype=np.float64)
        return cls(mlp=mlp, heads=heads, kv_groups=kv_groups, hidden=hidden, aggregation=aggregation)

    def to_dict(self) -> dict:
        return {
            "aggregation": self.aggregation,
            "mlp": [row.tolist() for row in self.mlp],
            "heads": [row.tolist() for row in self.heads],
            "kv_groups": [row.tolist() for row in self.kv_groups],
            "hidden": None if self.hidden is None else self.hidden.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChannelImportance:
        arrays = {key: [np.asarray(row, dtype=np.float64) for row in data[key]] for key in ("mlp", "heads", "kv_groups")}
        hidden = data.get("hidden")  # absent in analyses written before hidden channels were scored
        hidden = None if hidden is None else np.asarray(hidden, dtype=np.float64)
        return cls(aggregation=data.get("aggregation", AGGREGATION), hidden=hidden, **arrays)


class ChannelCollector:
    """Forward hooks on o_proj, down_proj and the pre-norms that accumulate per-block importances."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        config = text_config(model)
        spec = arch_for(model)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.layers = layers
        # The modules at the o / down paths: their input is what is scored (a factorized one, too).
        # (An MoE has no dense down_proj: its MLP channels are per expert, and not scored here.)
        self.linears = [{role: get_submodule(layer, spec.linear_paths[role]) for role in ("attn.o", "mlp.down")
                         if role in spec.linear_paths} for layer in layers]  # fmt: skip
        self.norms = [norm_modules(layer, spec) for layer in layers]
        self.sums: dict[tuple, torch.Tensor] = {}  # (kind, layer[, role]) -> sum over blocks of score^2
        self.blocks = 0
        self.mask: torch.Tensor | None = None  # the running batch's real tokens [b, seq] (None: all)

    def before(self, batch: Batch) -> None:
        self.mask = token_mask(batch)

    def _seq_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[b, seq, units] -> [b, units]: the mean over each sample's real tokens."""
        if self.mask is None:
            return values.mean(1)
        weights = self.mask.to(values.device, values.dtype).unsqueeze(-1)  # [b, seq, 1]
        return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def attach(self) -> list:
        """Register the hooks; returns their handles (remove them when done)."""
        handles = []
        for index, (linears, norms) in enumerate(zip(self.linears, self.norms)):
            handles.append(linears["attn.o"].register_forward_pre_hook(self._head_hook(index)))
            if "mlp.down" in linears:
                handles.append(linears["mlp.down"].register_forward_pre_hook(self._input_hook(("mlp", index))))
            for role in ("attn.pre", "mlp.pre"):
                handles.append(norms[role].register_forward_hook(self._output_hook(("hidden", index, role))))
        # Blocks are counted on the first layer's o_proj input: one call per forward.
        handles.append(self.linears[0]["attn.o"].register_forward_pre_hook(self._count))
        return handles

    def _count(self, module, args) -> None:
        self.blocks += int(args[0].shape[0])

    def _add(self, key: tuple, per_block: torch.Tensor) -> None:
        """per_block [batch, units]: one score per calibration block -> accumulate its square."""
        value = per_block.double().pow(2).sum(0).cpu()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _input_hook(self, key: tuple) -> Callable:
        def hook(module, args):
            self._add(key, self._seq_mean(args[0].float().abs()))  # [b, seq, units] -> [b, units]

        return hook

    def _output_hook(self, key: tuple) -> Callable:
        def hook(module, args, output):
            self._add(key, self._seq_mean(output.float().abs()))

        return hook

    def _head_hook(self, index: int) -> Callable:
        def hook(module, args):
            attn = args[0]  # [batch, seq, n_heads * head_dim]
            per_head = attn.float().unflatten(-1, (self.n_heads, -1)).norm(dim=-1)  # [b, seq, heads]
            self._add(("heads", index), self._seq_mean(per_head))

        return hook

    def _rms(self, key: tuple) -> np.ndarray:
        return (self.sums[key] / max(1, self.blocks)).sqrt().numpy()

    def result(self) -> ChannelImportance:
        n = len(self.layers)
        hidden = sum(self._rms(key) for key in self.sums if key[0] == "hidden")
        return ChannelImportance.from_heads(
            mlp=[self._rms(("mlp", i)) if ("mlp", i) in self.sums else np.zeros(0) for i in range(n)],
            heads=[self._rms(("heads", i)) for i in range(n)],
            hidden=hidden,
            n_kv=self.n_kv,
        )


def channel_importance(model: nn.Module, layers: nn.ModuleList, batches: Iterable[Batch]) -> ChannelImportance:
    """Minitron importances of `model` over calibration `batches` ([batch, seq] ids or padded sentences)."""
    collector = ChannelCollector(model, layers)
    forward_with_hooks(model, batches, collector.attach(), collector.before)
    return collector.result()


def top_k(values, k: int) -> torch.Tensor:
    """Indices of the k largest values, in ascending index order (ties: the lower index wins).

    What prune.width keeps and what the analysis calls the most important units.
    """
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return torch.as_tensor(np.sort(order[:k]), dtype=torch.long)
