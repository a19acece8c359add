"""`RelaxedLinear`: one depth's use of a weight shared across depths, plus its own low-rank delta.

share.layers (Relaxed Recursive Transformers, Bae et al. 2024) makes several depths of a model
read one weight Φ'; each depth may add its own rank-r delta B·A ("layer-wise LoRA"), so

    y = x Φ'ᵀ + bias + (x Aᵀ) Bᵀ        weight Φ' [out, in] (shared), A [r, in], B [out, r]

`weight` is the very nn.Parameter the other depths hold (one tensor, one gradient, one optimizer
state, saved once); `bias`, `relax_a`, `relax_b` belong to this depth. It is not an nn.Linear on
purpose: code that rewrites a Linear's weight in place (quantization, pruning) would silently drop
the delta or write one depth's result into every depth, so it refuses a RelaxedLinear instead.
The state-dict names are `<module>.weight`, `<module>.bias`, `<module>.relax_a`, `<module>.relax_b`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RelaxedLinear(nn.Module):
    """F.linear with a shared `weight` and this depth's `bias` plus delta `relax_b @ relax_a`."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, rank: int) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.weight = weight
        self.bias = bias
        like = {"dtype": weight.dtype, "device": weight.device}
        self.relax_a = nn.Parameter(torch.zeros(rank, in_features, **like), requires_grad=weight.requires_grad)
        self.relax_b = nn.Parameter(torch.zeros(out_features, rank, **like), requires_grad=weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.relax_a), self.relax_b)

    def dense_weight(self) -> torch.Tensor:
        """This depth's effective weight Φ' + B·A [out, in] (a new tensor, no gradient)."""
        with torch.no_grad():
            delta = self.relax_b.float() @ self.relax_a.float()
            return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
