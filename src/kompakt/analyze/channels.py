"""Activation-based importance of MLP channels and attention heads (Minitron).

Muralidharan et al. 2024 ("Compact Language Models via Pruning and Knowledge Distillation")
score structure by the activations it produces on calibration text and compare ways to
aggregate over sequence and batch. Choice here (theirs for width pruning: L2 over the
sequence, mean over the batch), with the L2 divided by sqrt(sequence length) so the
numbers read as an RMS activation and do not grow with the block length (same ranking):

- MLP channel j of layer i: RMS over positions of the input of down_proj, channel j
  (= act(gate) * up, the intermediate activation), then mean over calibration blocks.
- Attention head h: the head's slice of the input of o_proj (its attention output,
  head_dim values) -> L2 norm per position -> RMS over positions -> mean over blocks.
- KV group g (GQA): the sum of the importances of the query heads that share KV head g
  (query heads g * n_rep .. (g + 1) * n_rep - 1, the order `repeat_kv` uses); pruning a KV
  head removes all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from kompakt.model.arch import ArchSpec, linear_modules, text_config

AGGREGATION = "RMS over positions (L2 / sqrt(seq)), mean over calibration blocks (Minitron: batch=mean, seq=L2)"


@dataclass
class ChannelImportance:
    """Per decoder layer: mlp [intermediate], heads [n_heads], kv_groups [n_kv_heads]."""

    mlp: list[np.ndarray]
    heads: list[np.ndarray]
    kv_groups: list[np.ndarray]
    aggregation: str = AGGREGATION

    def to_dict(self) -> dict:
        return {
            "aggregation": self.aggregation,
            "mlp": [row.tolist() for row in self.mlp],
            "heads": [row.tolist() for row in self.heads],
            "kv_groups": [row.tolist() for row in self.kv_groups],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChannelImportance:
        arrays = {key: [np.asarray(row, dtype=np.float64) for row in data[key]] for key in ("mlp", "heads", "kv_groups")}
        return cls(aggregation=data.get("aggregation", AGGREGATION), **arrays)


def _rms_over_positions(values: torch.Tensor) -> torch.Tensor:
    """[batch, seq, k] -> [batch, k]: sqrt(mean over seq of values^2), in fp32."""
    return values.float().pow(2).mean(dim=1).sqrt()


class ChannelCollector:
    """Forward pre-hooks on o_proj and down_proj that accumulate per-block importances."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, spec: ArchSpec) -> None:
        config = text_config(model)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.modules = [linear_modules(layer, spec) for layer in layers]
        self.mlp_sums: list[torch.Tensor | None] = [None] * len(layers)
        self.head_sums: list[torch.Tensor | None] = [None] * len(layers)
        self.blocks = 0

    def attach(self) -> list:
        """Register the hooks; returns their handles (remove them when done)."""
        handles = []
        for index, roles in enumerate(self.modules):
            handles.append(roles["attn.o"].register_forward_pre_hook(self._head_hook(index)))
            handles.append(roles["mlp.down"].register_forward_pre_hook(self._mlp_hook(index)))
        return handles

    def count_blocks(self, n: int) -> None:
        self.blocks += n

    def _mlp_hook(self, index: int) -> Callable:
        def hook(module, args):
            per_block = _rms_over_positions(args[0])  # [batch, intermediate]
            self._add(self.mlp_sums, index, per_block.sum(0))

        return hook

    def _head_hook(self, index: int) -> Callable:
        def hook(module, args):
            attn = args[0]  # [batch, seq, n_heads * head_dim]
            per_head = attn.reshape(*attn.shape[:2], self.n_heads, -1).float().norm(dim=-1)  # [b, s, heads]
            self._add(self.head_sums, index, _rms_over_positions(per_head).sum(0))

        return hook

    @staticmethod
    def _add(sums: list, index: int, value: torch.Tensor) -> None:
        value = value.double().cpu()
        sums[index] = value if sums[index] is None else sums[index] + value

    def result(self) -> ChannelImportance:
        blocks = max(1, self.blocks)
        mlp = [(s / blocks).numpy() for s in self.mlp_sums]
        heads = [(s / blocks).numpy() for s in self.head_sums]
        per_group = self.n_heads // self.n_kv
        kv_groups = [h.reshape(self.n_kv, per_group).sum(-1) for h in heads]
        return ChannelImportance(mlp=mlp, heads=heads, kv_groups=kv_groups)


def tiny_fraction(values: np.ndarray, threshold: float = 0.1) -> float:
    """Fraction of entries below `threshold` x the median of their layer (the median, not the
    mean: a few outlier channels with huge activations would inflate the mean)."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values)) if values.size else 0.0
    return float((values < threshold * median).mean()) if median > 0 else 0.0
