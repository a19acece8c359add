"""A Linear stored as two: `LowRankLinear`, and the surgery that swaps it in and out.

    factorize_linear(model, "model.layers.0.mlp.up_proj", up=B, down=A, method="svd-llm")
    merge_lowrank(model)          # back to dense nn.Linear (GGUF / HF export with --merge)

`LowRankLinear` is an nn.Sequential of two ordinary nn.Linear: `<name>.0` A [rank, in] without
bias, then `<name>.1` B [out, rank] with the original bias, so y = B(Ax) + b is the dense layer
exactly when B·A = W, and every pass that treats Linears (quant.rtn / quant.gptq on the
factors, distillation) sees plain Linears. It costs two matmuls instead of one: r·(in + out)
multiply-adds per token instead of in·out, faster only well below the break-even rank.

Which modules are factorized, at which rank and by which method, is the `lowrank` field of the
compression state (kompakt.model.compression); save writes the factors as ordinary safetensors
tensors (`...up_proj.0.weight`, `...up_proj.1.weight`) and kompakt.model.lowrank_load rebuilds
the model from them. transformers alone cannot load such a directory (it would expect
`...up_proj.weight`), which is why exports merge first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from kompakt.model.compression import LowRank, get_state, update_state

MODULE_TYPE = "LowRankLinear"  # what config.json names; kompakt.load refuses any other


class LowRankLinear(nn.Sequential):
    """y = B(A x) + b with A = self[0] (Linear in -> rank, no bias), B = self[1] (rank -> out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, method: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(
            nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype),
            nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype),
        )
        self.method = method  # how the factors were computed ("svd-llm", ...), for the state

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[1].out_features

    @property
    def rank(self) -> int:
        return self[0].out_features

    def dense_weight(self) -> torch.Tensor:
        """B·A [out, in], computed in fp32 and returned in the factors' dtype."""
        return (self[1].weight.float() @ self[0].weight.float()).to(self[0].weight.dtype)

    def to_linear(self) -> nn.Linear:
        """The dense equivalent (same device, dtype and bias)."""
        up = self[1]
        dense = nn.Linear(self.in_features, self.out_features, bias=up.bias is not None,
                          device=up.weight.device, dtype=up.weight.dtype)  # fmt: skip
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if up.bias is not None:
                dense.bias.copy_(up.bias)
        return dense


@torch.no_grad()
def factorize_linear(model: nn.Module, name: str, *, up: torch.Tensor, down: torch.Tensor, method: str) -> LowRankLinear:
    """Replace the Linear `name` of `model` by up [out, r] · down [r, in] (its bias kept) and
    record it in the compression state. The factors take the Linear's device and dtype."""
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
    weight = linear.weight
    module = LowRankLinear(linear.in_features, linear.out_features, int(down.shape[0]), linear.bias is not None,
                           method, device=weight.device, dtype=weight.dtype)  # fmt: skip
    module[0].weight.copy_(down)
    module[1].weight.copy_(up)
    if linear.bias is not None:
        module[1].bias.copy_(linear.bias)
    model.set_submodule(name, module)
    record_lowrank(model)
    return module


def record_lowrank(model: nn.Module) -> None:
    """Set the `lowrank` state from the modules themselves, so it follows surgery that renames
    them (prune.depth renumbers layers); saving calls it before config.json is written."""
    entries = {name: LowRank(rank=m.rank, method=m.method, module=MODULE_TYPE) for name, m in lowrank_modules(model).items()}
    if entries or get_state(model).lowrank:
        update_state(model, lowrank=entries)


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Name -> every LowRankLinear of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@torch.no_grad()
def merge_lowrank(model: nn.Module) -> list[str]:
    """Replace every LowRankLinear by its dense equivalent and clear the `lowrank` state; the
    names merged. The merged weights are no longer on any quantization grid the factors were on,
    so callers that keep the model must clear its quantization state too."""
    merged = lowrank_modules(model)
    for name, module in merged.items():
        model.set_submodule(name, module.to_linear())
    record_lowrank(model)
    return sorted(merged)


def build_lowrank(model: nn.Module, entries: Mapping[str, LowRank]) -> None:
    """Swap empty LowRankLinear modules in where `entries` says (the loader then fills them).

    Raises ValueError naming what does not fit (an unknown module type or module name).
    """
    for name, entry in entries.items():
        if entry.module != MODULE_TYPE:
            raise ValueError(f"{name} is stored as module type {entry.module!r}, which this kompakt does not know")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"it factorizes {name}, which this model has no module named") from None
        if not isinstance(linear, nn.Linear) or entry.rank < 1:
            raise ValueError(f"it factorizes {name} ({type(linear).__name__}) at rank {entry.rank}")
        module = LowRankLinear(linear.in_features, linear.out_features, entry.rank, linear.bias is not None,
                               entry.method, device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip
        model.set_submodule(name, module)
