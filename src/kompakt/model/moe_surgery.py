"""Width surgery of MoE layers: keep some intermediate channels of every expert (and of the
shared expert), leaving config.json consistent so save -> from_pretrained reloads the same model.

transformers keeps one expert width per model (`moe_intermediate_size`, Mixtral / OLMoE:
`intermediate_size`), so every expert of every layer keeps the same number of channels, each
its own: gate_up_proj [E, 2I, H] keeps rows [gate idx | up idx] per expert, down_proj [E, H, I]
keeps those columns. The shared expert (Qwen2-MoE) is an ordinary gated MLP with its own width key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import decoder_layers, get_submodule, text_config
from kompakt.model.loaded import LoadedModel
from kompakt.model.moe import _set_param, expert_width, experts_module, moe_spec, num_experts
from kompakt.model.surgery import Keep, as_index, check_config, finish, linear, per_layer, slice_linear

# transformers runs the experts with torch's grouped_mm, whose operand strides must be multiples of
# 16 bytes: an expert width that is a multiple of 8 works in fp32, fp16 and bf16 alike.
WIDTH_MULTIPLE = 8


def shrink_experts(loaded: LoadedModel, keep: Sequence[Sequence[Keep]]) -> tuple[LoadedModel, dict[str, Any]]:
    """Keep the given channels of each expert: keep[layer][expert] is an index list, every one
    of the same length. Everything is checked before the first edit."""
    spec = moe_spec(loaded)
    layers = decoder_layers(loaded)
    old, n_experts = expert_width(loaded), num_experts(loaded)
    if len(keep) != len(layers) or any(len(per) != n_experts for per in keep):
        raise ConfigError(f"give one channel list per expert ({n_experts}) for each of the {len(layers)} layers")
    indices = [[as_index(k, old, "expert channel") for k in per] for per in keep]
    counts = {int(i.numel()) for per in indices for i in per}
    if len(counts) != 1:
        raise ConfigError(f"keep the same number of channels in every expert (got counts {sorted(counts)})")
    new = counts.pop()
    if new % WIDTH_MULTIPLE and new != old:
        raise ConfigError(f"keep a multiple of {WIDTH_MULTIPLE} channels per expert (got {new}): transformers' "
                          "grouped expert kernel needs 16-byte strides")  # fmt: skip
    check_config(loaded, **{spec.intermediate_key: new})
    before = loaded.num_parameters()
    for layer, per in zip(layers, indices, strict=True):
        experts = experts_module(layer, spec)
        gate_up, down = getattr(experts, spec.gate_up).data, getattr(experts, spec.down).data
        rows = [torch.cat([index, index + old]) for index in per]  # [gate | up] halves of each expert
        _set_param(experts, spec.gate_up, torch.stack([gate_up[e, r] for e, r in enumerate(rows)]))
        _set_param(experts, spec.down, torch.stack([down[e][:, i] for e, i in enumerate(per)]))
        if isinstance(getattr(experts, "intermediate_dim", None), int):
            experts.intermediate_dim = new
    setattr(text_config(loaded), spec.intermediate_key, new)
    return finish(loaded, before, {spec.intermediate_key: [old, new]})


def shrink_shared_expert(loaded: LoadedModel, keep: Keep | Sequence[Keep]) -> tuple[LoadedModel, dict[str, Any]]:
    """Keep the given channels of every layer's shared expert (one index, or one per layer)."""
    spec = moe_spec(loaded)
    if spec.shared_expert is None:
        raise ConfigError("this MoE family has no shared expert")
    config = text_config(loaded)
    layers = decoder_layers(loaded)
    old = int(getattr(config, spec.shared_intermediate_key))
    keeps = per_layer(keep, len(layers), old, "shared-expert channel")
    new = int(keeps[0].numel())
    check_config(loaded, **{spec.shared_intermediate_key: new})
    before = loaded.num_parameters()
    for layer, index in zip(layers, keeps, strict=True):
        shared = get_submodule(layer, spec.shared_expert)
        slice_linear(linear(shared, "gate_proj"), rows=index)
        slice_linear(linear(shared, "up_proj"), rows=index)
        slice_linear(linear(shared, "down_proj"), cols=index)
        if isinstance(getattr(shared, "intermediate_size", None), int):
            shared.intermediate_size = new
    setattr(config, spec.shared_intermediate_key, new)
    return finish(loaded, before, {spec.shared_intermediate_key: [old, new]})
