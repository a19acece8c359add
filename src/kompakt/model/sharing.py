"""Decoder layers that share their weights (share.layers): tie, save once, rebuild on load, merge.

The model stays a standard transformers model: every depth keeps its own decoder layer object
(its own attention `layer_idx`, so the KV cache is right, its own norms and biases), and the
Linears of the depths that share a block hold the *same* nn.Parameter as weight — directly (a
plain nn.Linear whose `.weight` is the owner's) or inside a RelaxedLinear that adds the depth's
own low-rank delta (kompakt.model.relaxed). Autograd then sums the gradients of all depths into
that one tensor, `model.parameters()` yields it once (one optimizer state), and parameter counts
and bytes (LoadedModel.num_parameters, kompakt.evaluate.size) count it once.

The record is `CompressionState.shared` (kompakt.model.compression): owner Linear -> the users
that read its weight and the relaxation rank.

- `tie_layers(loaded, groups, values, relax_rank)`: the surgery share.layers does.
- `stored_state_dict(model, state)`: what the save writes: each shared tensor once, under its
  owner's name (users dropped; safetensors cannot alias tensors).
- `load_shared_model(directory, dtype)`: kompakt.load's path for such a directory: the model is
  built from config.json by transformers, the ties and RelaxedLinears are rebuilt from the record
  with kompakt's own modules (no trust_remote_code, no pickle), then the stored tensors are read
  into it, every parameter accounted for.
- `merged_dense(loaded)`: a copy with every depth's own dense weight (Φ' + B·A) in plain Linears,
  for exporters that cannot store sharing (GGUF, plain HF): back to full size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kompakt.errors import ConfigError, ModelFormatError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, set_submodule
from kompakt.model.compression import SharedWeights, get_state, update_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.lowrank import build_lowrank
from kompakt.model.relaxed import RelaxedLinear
from kompakt.model.surgery import finish, linear, require_linears
from kompakt.ops.residual_svd import residual_factors

# (unique block index, Linear role such as "attn.q") -> the block's shared weight value
SharedValues = Callable[[int, str], torch.Tensor]
# (depth, Linear role) -> that depth's relaxation factors (B [out, r], A [r, in])
DeltaFactors = Callable[[int, str], tuple[torch.Tensor, torch.Tensor]]


def is_shared(target: LoadedModel | nn.Module) -> bool:
    """Whether some weights of the model are shared across layers (share.layers ran)."""
    return bool(get_state(target).shared)


def refuse_shared(target: LoadedModel | nn.Module, what: str) -> None:
    """ConfigError when the model shares layers, which `what` (e.g. "a gguf export") cannot store."""
    if is_shared(target):
        raise ConfigError(f"the model shares weights across layers (share.layers / share.basis), which {what} cannot store "
                          "(llama.cpp and plain transformers have no shared layers); export with --merge to write "
                          "the dense equivalent (back to full size)")  # fmt: skip


def check_same_layers(layers: Sequence[nn.Module], groups: Sequence[Sequence[int]],
                      paths: Sequence[str] | None = None) -> None:  # fmt: skip
    """ConfigError when two layers of a group differ in parameter names or shapes (after width
    pruning with per-layer widths, or a factorization with per-layer ranks): one block cannot
    serve both. `paths`: compare only the modules there (the shared Linears; per-depth norms may
    differ, e.g. ModernBERT's first layer has no attention norm)."""

    def shapes(layer: nn.Module) -> dict[str, tuple[int, ...]]:
        found = {name: tuple(p.shape) for name, p in layer.named_parameters()}
        if paths is None:
            return found
        return {name: shape for name, shape in found.items() if any(name.startswith(f"{p}.") for p in paths)}

    for group in groups:
        first = shapes(layers[group[0]])
        for depth in group[1:]:
            other = shapes(layers[depth])
            if other != first:
                diff = sorted(set(first.items()) ^ set(other.items()))
                what = diff[0][0] if diff else "their structure"
                raise ConfigError(f"share.layers: layers {group[0]} and {depth} differ in shape ({what}), so they "
                                  "cannot share one block; share layers before per-layer width pruning or "
                                  "factorization")  # fmt: skip


def check_shareable(loaded: LoadedModel, groups: Sequence[Sequence[int]]) -> None:
    """ConfigError unless every group's layers can share one block: plain Linears of equal shapes,
    in a model that shares nothing yet (said before any calibration work)."""
    spec, layers = arch_for(loaded.model), decoder_layers(loaded.model)
    if is_shared(loaded):
        raise ConfigError("share.layers: this model already shares layers; apply share.layers once")
    require_linears(layers, spec.linear_paths.values())
    check_same_layers(layers, groups, list(spec.linear_paths.values()))


def tie_layers(loaded: LoadedModel, groups: Sequence[Sequence[int]], values: SharedValues,
               relax_rank: int, deltas: DeltaFactors | None = None) -> tuple[LoadedModel, dict[str, Any]]:  # fmt: skip
    """Make the layers of each group (depth indices; the first is the owner) share one block, in place.

    Every Linear role of the block gets the weight `values(block, role)` (computed for all blocks
    before any layer changes, so a value may read any original layer). With `relax_rank` r > 0
    each depth's Linear becomes a RelaxedLinear of rank min(r, out, in) whose delta is
    `deltas(depth, role)`, or by default the truncated SVD of (its original weight − the shared
    one): at full rank every depth is recovered. Norms and biases stay per depth.
    """
    model = loaded.model
    spec, layers = arch_for(model), decoder_layers(model)
    check_shareable(loaded, groups)
    before = loaded.num_parameters()
    with torch.no_grad():
        new = {(b, role): values(b, role).detach().clone() for b in range(len(groups)) for role in spec.linear_paths}
        entries: dict[str, SharedWeights] = {}
        for block, group in enumerate(groups):
            for role, path in spec.linear_paths.items():
                given = (lambda depth, role=role: deltas(depth, role)) if deltas else None
                entries[f"{spec.layers}.{group[0]}.{path}"] = _tie_role(layers, group, path, new[(block, role)],
                                                                        relax_rank, spec.layers, given)  # fmt: skip
    update_state(loaded, shared=entries)
    changes = {"unique_blocks": len(groups), "num_hidden_layers": len(layers), "relax_rank": relax_rank,
               "shared_tensors": len(entries)}  # fmt: skip
    return finish(loaded, before, changes)


def _tie_role(layers: Sequence[nn.Module], group: Sequence[int], path: str, value: torch.Tensor,
              relax_rank: int, prefix: str,
              deltas: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None) -> SharedWeights:  # fmt: skip
    """One role of one block: a new shared Parameter read by every depth of the group."""
    first = linear(layers[group[0]], path).weight
    shared = nn.Parameter(value.to(device=first.device, dtype=first.dtype), requires_grad=first.requires_grad)
    rank = min(relax_rank, *shared.shape)
    for depth in group:
        module = linear(layers[depth], path)
        if rank:
            relaxed = RelaxedLinear(shared, module.bias, rank)
            b, a = deltas(depth) if deltas else residual_factors(module.weight, shared, rank)
            relaxed.relax_b.copy_(b)
            relaxed.relax_a.copy_(a)
            set_submodule(layers[depth], path, relaxed)
        else:
            module.weight = shared
    return SharedWeights(users=tuple(f"{prefix}.{d}.{path}" for d in group[1:]), relax_rank=rank)


def rebuild_ties(model: nn.Module, shared: Mapping[str, SharedWeights], where: str) -> None:
    """Re-create the ties and RelaxedLinears a `shared` record describes on a freshly built model.

    Raises ModelFormatError when the record names a module this model lacks, or one that is not
    a Linear of the owner's shape (the weights would not go where they belong).
    """
    for owner, entry in shared.items():
        names = [owner, *entry.users]
        modules = [_plain_linear(model, name, where) for name in names]
        weight = modules[0].weight
        if any(m.weight.shape != weight.shape for m in modules) or entry.relax_rank > min(weight.shape):
            raise ModelFormatError(f"{where}: config.json shares {owner} with modules of another shape or a rank "
                                   "above its size; restore config.json as kompakt wrote it")  # fmt: skip
        for name, module in zip(names, modules, strict=True):
            if entry.relax_rank:
                set_submodule(model, name, RelaxedLinear(weight, module.bias, entry.relax_rank))
            else:
                module.weight = weight


def _plain_linear(model: nn.Module, name: str, where: str) -> nn.Linear:
    try:
        module = get_submodule(model, name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ModelFormatError(f"{where}: config.json shares the weight of {name}, which is not a Linear of this "
                               "model (a newer kompakt, or an edited config.json); upgrade kompakt or restore "
                               "config.json as kompakt wrote it")  # fmt: skip
    return module


def stored_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The state dict to save (None: the model's own): each shared tensor once, under its owner's name."""
    shared = get_state(model).shared
    if not shared:
        return state
    stored = dict(model.state_dict() if state is None else state)
    for owner, entry in shared.items():
        weight = get_submodule(model, owner).weight
        for user in entry.users:
            if get_submodule(model, user).weight is not weight:  # the record would lose a real tensor
                raise RuntimeError(f"{user} is recorded as sharing {owner}'s weight but holds its own")
            stored.pop(f"{user}.weight", None)
    return stored


def load_shared_model(directory: Path, dtype: torch.dtype) -> nn.Module:
    """Build the model of a shared-layers directory from config.json and read its weights (CPU, eval).

    The directory was saved in the model's own tensor names (kompakt.model.save), which are the
    names of `model.state_dict()` here.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig

    from kompakt.model.arch import is_encoder_family
    from kompakt.model.hf_dir import safetensors_files
    from kompakt.model.progress import quiet_third_party

    where = str(directory)
    with quiet_third_party():
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        auto = AutoModel if is_encoder_family(config) else AutoModelForCausalLM  # an encoder loads headless
        model = auto.from_config(config, dtype=dtype)
    _build_factors(model, where)  # share.basis shares a factor of factorized Linears: build those first
    rebuild_ties(model, get_state(model).shared, where)
    tensors = _read_tensors(safetensors_files(directory))
    _check_complete(model, tensors, where)
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a shape that does not match the config
        raise ModelFormatError(f"{where}: its weights do not fit its config.json ({str(exc).splitlines()[-1][:160]}); "
                               "copy the model again") from None  # fmt: skip
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _build_factors(model: nn.Module, where: str) -> None:
    """Swap in the LowRankLinears the `lowrank` record names (their factors may be what is shared)."""
    try:
        build_lowrank(model, get_state(model).lowrank)
    except ValueError as exc:
        raise ModelFormatError(f"{where} cannot be rebuilt: {exc}; upgrade kompakt") from None


def _read_tensors(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _check_complete(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Every parameter (each shared one under any of its names) is in the files, nothing else is."""
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(expected))
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = [names[0] for names in names_of.values() if not any(n in tensors for n in names)]
    if unexpected or missing:
        what = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which its config.json does not describe"
        raise ModelFormatError(f"{where} {what} ({len(missing)} missing, {len(unexpected)} unknown tensors); "
                               "copy the model again or restore config.json as kompakt wrote it")  # fmt: skip


def merged_dense(loaded: LoadedModel) -> LoadedModel:
    """A copy of `loaded` with no sharing: every depth's own effective weight (Φ' + B·A for a
    RelaxedLinear) in a plain nn.Linear, the record cleared. `loaded` itself is not changed; a model
    that shares nothing is returned as it is. The result has the original's full size."""
    shared = get_state(loaded).shared
    if not shared:
        return loaded
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for owner, entry in shared.items():
            for name in (owner, *entry.users):
                set_submodule(model, name, _dense_linear(get_submodule(model, name)))
    update_state(model, shared={})
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=loaded.name, path=None,
                       storage_dtype=loaded.storage_dtype, pooling=loaded.pooling)  # fmt: skip


def _dense_linear(module: nn.Module) -> nn.Linear:
    """A plain Linear with its own copy of the module's effective weight (and bias)."""
    weight = module.dense_weight() if isinstance(module, RelaxedLinear) else module.weight.detach().clone()
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return dense
