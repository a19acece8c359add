"""Mixture-of-Experts layout: read and edit experts, router and top-k through the ArchSpec.

transformers 5 stores a layer's experts fused, as 3-D parameters of one `*Experts` module
(`gate_up_proj` [E, 2I, H] with rows [gate | up] per expert, `down_proj` [E, H, I]), and routes
with a `*TopKRouter` whose `weight` [E, H] is a Parameter (softmax over experts, top-k, optionally
renormalised). Everything that touches experts (calibration, scoring, moe.prune / moe.merge /
moe.topk, export) goes through these accessors, so no pass knows a class name:

    spec = moe_spec(loaded)
    for index, layer in enumerate(decoder_layers(loaded)):
        w = expert_linears(layer, spec, 0)        # {"expert.gate": [I, H], "expert.up", "expert.down"} views
        probs, idx, gates = route(layer, spec, x)  # x [T, H]: what the block's router decides
    keep_experts(loaded, [[0, 2], [1, 3]])         # per layer; router rows and config follow
    set_top_k(loaded, 1)

An expert's weights are views into the fused parameters: writing into them (quantization,
sparsity) edits the model in place. Every edit leaves config.json consistent, so save ->
from_pretrained reloads the same logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import MoESpec, arch_for, decoder_layers, get_submodule, linear_modules, linear_path, text_config
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

EXPERT_ROLES = ("expert.gate", "expert.up", "expert.down")


@dataclass
class ExpertTensors:
    """One layer's experts as plain tensors: what `set_experts` writes back.

    gate_up: [E, 2I, H], rows [gate | up] per expert; down: [E, H, I]; router: [E, H].
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    router: torch.Tensor

    @property
    def num_experts(self) -> int:
        return int(self.gate_up.shape[0])

    def select(self, index: torch.Tensor) -> ExpertTensors:
        """The experts at `index` (in that order)."""
        return ExpertTensors(self.gate_up[index], self.down[index], self.router[index])


def moe_spec(model: Any) -> MoESpec:
    """The MoESpec of a model / LoadedModel / config; ConfigError for a dense family."""
    spec = arch_for(model).moe
    if spec is None:
        raise ConfigError(f"{arch_for(model).family} is not a Mixture-of-Experts model; expert edits need one")
    return spec


def _model(model: Any) -> nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def num_experts(model: Any) -> int:
    return int(getattr(text_config(model), moe_spec(model).num_experts_key))


def top_k(model: Any) -> int:
    return int(getattr(text_config(model), moe_spec(model).top_k_key))


def renormalizes(model: Any) -> bool:
    """Whether the chosen top-k router probabilities are rescaled to sum to one."""
    rule = moe_spec(model).renormalize
    return rule if isinstance(rule, bool) else bool(getattr(text_config(model), rule, False))


def expert_width(model: Any) -> int:
    """The intermediate size of one routed expert."""
    return int(getattr(text_config(model), moe_spec(model).intermediate_key))


def sparse_layer_problem(model: Any) -> str | None:
    """Why the model's layers are not all sparse MoE blocks (Qwen's mlp_only_layers /
    decoder_sparse_step make some dense), or None when every layer is sparse."""
    config = text_config(model)
    spec = moe_spec(model)
    if "mlp_only_layers" in spec.dense_layer_keys and list(getattr(config, "mlp_only_layers", None) or []):
        return f"layers {list(config.mlp_only_layers)} are dense (mlp_only_layers)"
    if "decoder_sparse_step" in spec.dense_layer_keys and int(getattr(config, "decoder_sparse_step", 1) or 1) != 1:
        return f"decoder_sparse_step={config.decoder_sparse_step} makes some layers dense"
    return None


def require_all_sparse(model: Any) -> None:
    problem = sparse_layer_problem(model)
    if problem:
        raise ConfigError(f"kompakt supports MoE models whose every layer is sparse; {problem}")


def experts_module(layer: nn.Module, spec: MoESpec) -> nn.Module:
    return get_submodule(layer, spec.experts)


def router_module(layer: nn.Module, spec: MoESpec) -> nn.Module:
    return get_submodule(layer, spec.router)


def router_weight(layer: nn.Module, spec: MoESpec) -> nn.Parameter:
    """The router's scoring matrix [E, H] (a Parameter of the router, not a Linear)."""
    return router_module(layer, spec).weight


def get_experts(layer: nn.Module, spec: MoESpec) -> ExpertTensors:
    """The layer's fused expert parameters and router weight (the live tensors, not copies)."""
    experts = experts_module(layer, spec)
    return ExpertTensors(
        getattr(experts, spec.gate_up).data, getattr(experts, spec.down).data, router_weight(layer, spec).data
    )


def expert_linears(layer: nn.Module, spec: MoESpec, expert: int) -> dict[str, torch.Tensor]:
    """Role -> weight of one expert as a Linear would hold it ([out, in]): views into the fused
    parameters, so in-place writes edit the model. gate/up: [I, H], down: [H, I]."""
    fused = get_experts(layer, spec)
    width = fused.gate_up.shape[1] // 2
    return {
        "expert.gate": fused.gate_up[expert, :width],
        "expert.up": fused.gate_up[expert, width:],
        "expert.down": fused.down[expert],
    }


def expert_forward(layer: nn.Module, spec: MoESpec, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output for tokens x [T, H] (before the router's gate value), [T, H]."""
    weights = expert_linears(layer, spec, expert)
    act = experts_module(layer, spec).act_fn
    x = x.to(weights["expert.gate"].dtype)
    hidden = act(x @ weights["expert.gate"].T) * (x @ weights["expert.up"].T)
    return hidden @ weights["expert.down"].T


def route(layer: nn.Module, spec: MoESpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the layer's router decides for tokens x [T, H]: (probabilities over all experts
    [T, E] (softmax of the router logits), chosen experts [T, k], their gate values [T, k] as
    the block weights them, renormalised or not as the family does)."""
    router = router_module(layer, spec)
    with torch.no_grad():
        logits, gates, chosen = router(x.reshape(-1, x.shape[-1]))
    return torch.softmax(logits.float(), dim=-1), chosen, gates


def set_experts(loaded: LoadedModel, layers: Sequence[ExpertTensors]) -> dict[str, Any]:
    """Replace every layer's experts and router rows (one ExpertTensors per layer, the same
    expert count in each); config and cached counts follow. Checks everything before editing."""
    spec = moe_spec(loaded)
    blocks = decoder_layers(loaded)
    if len(layers) != len(blocks):
        raise ConfigError(f"got experts for {len(layers)} layers, the model has {len(blocks)}; give one per layer")
    counts = {t.num_experts for t in layers}
    if len(counts) != 1:
        raise ConfigError(f"keep the same number of experts in every layer (got counts {sorted(counts)})")
    count = counts.pop()
    k = top_k(loaded)
    if count < k:
        raise ConfigError(f"cannot keep {count} experts per layer with top-k {k}; keep at least {k} or lower top-k first")
    for tensors, layer in zip(layers, blocks, strict=True):
        old = get_experts(layer, spec)
        if tensors.gate_up.shape[1:] != old.gate_up.shape[1:] or tensors.down.shape[1:] != old.down.shape[1:] \
                or tensors.router.shape[1:] != old.router.shape[1:]:  # fmt: skip
            raise ConfigError("new expert tensors must keep each expert's shape; only the expert count may change")
    before = num_experts(loaded)
    for tensors, layer in zip(layers, blocks, strict=True):
        experts = experts_module(layer, spec)
        _set_param(experts, spec.gate_up, tensors.gate_up)
        _set_param(experts, spec.down, tensors.down)
        _set_param(router_module(layer, spec), "weight", tensors.router)
        _sync(get_submodule(layer, spec.block), spec.count_attrs, count)
    setattr(text_config(loaded), spec.num_experts_key, count)
    loaded.path = None
    loaded._fingerprint = None
    return {"num_experts": [before, count]}


def keep_experts(loaded: LoadedModel, keep: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Keep the given experts of each layer (one index list per layer, equal lengths): their
    weights and router rows, in the given order; the others are removed."""
    spec = moe_spec(loaded)
    total = num_experts(loaded)
    layers = decoder_layers(loaded)
    if len(keep) != len(layers):
        raise ConfigError(f"got {len(keep)} expert lists for {len(layers)} layers; give one per layer")
    new = []
    for i, (indices, layer) in enumerate(zip(keep, layers, strict=True)):
        index = torch.as_tensor(list(indices), dtype=torch.long)
        bad = index[(index < 0) | (index >= total)]
        if bad.numel() or index.unique().numel() != index.numel() or index.numel() == 0:
            raise ConfigError(f"layer {i}: expert indices must be distinct and in [0, {total}), got {index.tolist()}")
        new.append(get_experts(layer, spec).select(index))
    changes = set_experts(loaded, new)
    changes["kept"] = [list(map(int, k)) for k in keep]
    return changes


def set_top_k(loaded: LoadedModel, k: int) -> dict[str, Any]:
    """Route every token to k experts (config and the routers' cached top-k follow)."""
    spec = moe_spec(loaded)
    total = num_experts(loaded)
    if not 1 <= k <= total:
        raise ConfigError(f"top-k must be between 1 and the {total} experts per layer, got {k}")
    before = top_k(loaded)
    for layer in decoder_layers(loaded):
        _sync(get_submodule(layer, spec.block), spec.top_k_attrs, k)
    setattr(text_config(loaded), spec.top_k_key, k)
    loaded._fingerprint = None
    loaded.path = None
    return {"top_k": [before, k]}


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous().to(old.dtype), requires_grad=old.requires_grad))


def _sync(block: nn.Module, attrs: tuple[str, ...], value: int) -> None:
    """Set the cached copies of a config value (router.top_k, experts.num_experts, ...) in a block."""
    for module in block.modules():
        for attr in attrs:
            if isinstance(module.__dict__.get(attr), int):
                setattr(module, attr, value)


# --------------------------------------------------------------------------- experts as Linears

EXPERT_ROLE_PREFIX = "mlp.experts."
EXPERT_PARTS = ("gate", "up", "down")


def expert_role(expert: int, part: str) -> str:
    """The role of one expert's Linear: "mlp.experts.3.gate" (matches the "mlp" role pattern)."""
    return f"{EXPERT_ROLE_PREFIX}{expert}.{part}"


def is_expert_role(role: str) -> bool:
    return role.startswith(EXPERT_ROLE_PREFIX)


def parse_expert_role(role: str) -> tuple[int, str]:
    """("mlp.experts.3.gate") -> (3, "gate")."""
    expert, part = role.removeprefix(EXPERT_ROLE_PREFIX).split(".")
    return int(expert), part


def expert_module_name(spec: Any, layer_index: int, role: str) -> str:
    """The name an expert's Linear goes by in reports and the compression state:
    "model.layers.0.mlp.experts.3.gate" (ArchSpec paths; not a module of named_modules())."""
    expert, part = parse_expert_role(role)
    return f"{spec.layers}.{layer_index}.{spec.moe.experts}.{expert}.{part}"


def expert_linear_modules(layer: nn.Module, spec: MoESpec) -> dict[str, nn.Linear]:
    """Role -> a Linear whose weight shares storage with one expert's slice of the fused
    parameters ([out, in] as a Linear holds it), for every expert of the layer.

    Passes written for Linears (GPTQ, SparseGPT, Wanda, RTN) change `module.weight` in place and
    so edit the fused experts directly; the Linears are views, made anew per call (an expert
    edit that replaces the fused parameters leaves older views stale)."""
    result = {}
    for expert in range(int(getattr(experts_module(layer, spec), spec.gate_up).shape[0])):
        for role_part, weight in zip(EXPERT_PARTS, expert_linears(layer, spec, expert).values(), strict=True):
            result[expert_role(expert, role_part)] = _view_linear(weight)
    return result


def _view_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)  # shares the fused storage
    return linear


def all_linears(layer: nn.Module, spec: Any) -> dict[str, nn.Linear]:
    """Every Linear of a decoder layer by role: the ArchSpec's, then (MoE) each expert's view."""
    result = dict(linear_modules(layer, spec))
    if spec.moe is not None:
        result.update(expert_linear_modules(layer, spec.moe))
    return result


def all_roles(model: Any) -> list[str]:
    """The roles `all_linears` gives a layer of this model (expert roles for every expert)."""
    spec = arch_for(model)
    roles = list(spec.linear_paths)
    if spec.moe is not None:
        roles += [expert_role(e, part) for e in range(num_experts(model)) for part in EXPERT_PARTS]
    return roles


def linear_name(spec: Any, layer_index: int, role: str) -> str:
    """The full name of a role's Linear in layer `layer_index` (an expert's: expert_module_name)."""
    if is_expert_role(role):
        return expert_module_name(spec, layer_index, role)
    return f"{spec.layers}.{layer_index}.{linear_path(spec, role)}"


def named_weight(model: Any, name: str) -> torch.Tensor:
    """The weight a compression-state module name refers to: a module's `weight`, or for an
    expert name ("model.layers.0.mlp.experts.3.gate", expert_module_name) the [out, in] view of
    that expert's slice of the fused parameters."""
    model = _model(model)
    spec = arch_for(model)
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name].weight
    if spec.moe is not None:
        prefix = f"{spec.layers}."
        rest = name.removeprefix(prefix)
        index, _, role_path = rest.partition(".")
        experts_path = spec.moe.experts + "."
        if index.isdigit() and role_path.startswith(experts_path):
            expert, part = role_path.removeprefix(experts_path).split(".")
            layer = decoder_layers(model)[int(index)]
            return expert_linears(layer, spec.moe, int(expert))[f"expert.{part}"]
    raise KeyError(f"{name} is neither a module nor an expert of this model")
