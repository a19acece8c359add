"""Factors shared across layers (share.basis): one factor tensor read by several LowRankLinears.

Basis Sharing leaves each chosen Linear as a LowRankLinear (kompakt.model.lowrank: `<name>.0` A
[k, in] runs first, `<name>.1` B [out, k] second) and makes one of the two factors the *same*
nn.Parameter in every layer of a group: the shared basis. The record is the one share.layers
uses (`CompressionState.shared`, kompakt.model.sharing): the owner is the first layer's factor
Linear (e.g. `model.layers.4.self_attn.q_proj.0`), the users the same factor of the other
layers, `relax_rank` 0. So everything that already honours that record works unchanged: the
save stores the basis once under the owner's name, `kompakt.load` builds the LowRankLinears and
then the ties (kompakt.model.sharing.load_shared_model), parameter counts and bytes count the
basis once, autograd sums every layer's gradient into it (one optimizer state), and export
refuses it or, with `--merge`, unties and multiplies the factors back to dense.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kompakt.model.arch import get_submodule
from kompakt.model.compression import SharedWeights, get_state, update_state
from kompakt.model.lowrank import LowRankLinear

FACTORS = {"in": 0, "out": 1}  # which factor a side shares: A reads the input, B writes the output


def tie_factor(model: nn.Module, names: Sequence[str], side: str) -> str:
    """Make the `side` factor of the LowRankLinears `names` one tensor, the first one's; returns
    the owner's name. The others' own factor tensors are dropped (the caller set them equal, or
    wants the first one's). ValueError when a module is not a LowRankLinear of the owner's shape."""
    index = FACTORS[side]
    modules = [get_submodule(model, name) for name in names]
    owner = modules[0]
    for name, module in zip(names, modules, strict=True):
        if not isinstance(module, LowRankLinear) or module[index].weight.shape != owner[index].weight.shape:
            raise ValueError(f"{name} is not a LowRankLinear with a factor of {names[0]}'s shape")
    for module in modules[1:]:
        module[index].weight = owner[index].weight
    entries = dict(get_state(model).shared)
    entries[f"{names[0]}.{index}"] = SharedWeights(users=tuple(f"{name}.{index}" for name in names[1:]))
    update_state(model, shared=entries)
    return f"{names[0]}.{index}"


def shares_only_factors(model: nn.Module) -> bool:
    """Whether every shared tensor of the model is a plain factor of factorized Linears (share.basis),
    which a weight-by-weight pass may rewrite once for all its users; False for share.layers' ties."""
    state = get_state(model)
    return bool(state.shared) and all(
        entry.relax_rank == 0
        and all(name.rpartition(".")[0] in state.lowrank for name in (owner, *entry.users))
        for owner, entry in state.shared.items()
    )
