"""The ArchSpec table agrees with the real modules of every tiny family."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from kompakt.errors import UnsupportedArchitectureError
from kompakt.model.arch import (
    ARCHITECTURES,
    arch_for,
    decoder_layers,
    embeddings_tied,
    fused_splits,
    get_submodule,
    linear_modules,
    norm_modules,
    set_submodule,
    text_config,
)
from kompakt.model.tiny import TINY_FAMILIES, TINY_MOE, tiny_model

IDS = torch.tensor([[3, 70, 80, 90, 100, 110, 4]])


@pytest.fixture(scope="module", params=TINY_FAMILIES + TINY_MOE)
def tiny(request):
    return tiny_model(request.param)


def test_every_tiny_family_is_in_the_table():
    assert set(TINY_FAMILIES + TINY_MOE) <= set(ARCHITECTURES)


def test_paths_resolve(tiny):
    model = tiny.model
    spec = arch_for(tiny)
    assert spec.family == model.config.model_type
    assert spec is arch_for(model) is arch_for(model.config) is arch_for(model.config.to_dict())
    layers = decoder_layers(model)
    config = text_config(model)  # the decoder's config (the text part of Gemma 3's)
    assert isinstance(layers, nn.ModuleList) and len(layers) == config.num_hidden_layers
    assert decoder_layers(tiny) is layers
    assert isinstance(get_submodule(model, spec.embed), nn.Embedding)
    assert isinstance(get_submodule(model, spec.lm_head), nn.Linear)
    assert get_submodule(model, spec.final_norm).weight.shape == (config.hidden_size,)
    assert embeddings_tied(model) == model.config.tie_word_embeddings


def test_linear_roles_and_shapes(tiny):
    config = text_config(tiny)
    spec = arch_for(tiny)
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    expected = {
        "attn.q": (q_rows, config.hidden_size), "attn.k": (kv_rows, config.hidden_size),
        "attn.v": (kv_rows, config.hidden_size), "attn.o": (config.hidden_size, q_rows),
        "attn.qkv": (q_rows + 2 * kv_rows, config.hidden_size),
        "mlp.gate": (config.intermediate_size, config.hidden_size),
        "mlp.up": (config.intermediate_size, config.hidden_size),
        "mlp.gate_up": (2 * config.intermediate_size, config.hidden_size),
        "mlp.down": (config.hidden_size, config.intermediate_size),
        "mlp.shared_gate": (getattr(config, "shared_expert_intermediate_size", 0), config.hidden_size),
        "mlp.shared_up": (getattr(config, "shared_expert_intermediate_size", 0), config.hidden_size),
        "mlp.shared_down": (config.hidden_size, getattr(config, "shared_expert_intermediate_size", 0)),
    }  # fmt: skip
    for layer in decoder_layers(tiny):
        linears = linear_modules(layer, spec)
        fused = {"attn.qkv", "mlp.gate_up"} & set(linears)
        assert bool(fused) == (spec.fused_qkv or spec.fused_gate_up)
        for role, module in linears.items():
            assert isinstance(module, nn.Linear), role
            assert tuple(module.weight.shape) == expected[role], role
        for role in fused:
            assert sum(fused_splits(tiny)[role].values()) == linears[role].out_features
        # every Linear of the layer has a role: one left out would be skipped by every pass that
        # walks the roles (quantization, pruning, sensitivity) and by their tests, which walk them too
        found = {id(module) for module in linears.values()}
        unassigned = {name for name, module in layer.named_modules() if isinstance(module, nn.Linear) and id(module) not in found}
        assert unassigned <= {"mlp.shared_expert_gate"}, unassigned  # Qwen2-MoE's 1-row gate of the shared expert


def _captured(model: nn.Module, modules: dict[str, nn.Module], inputs: bool) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(role: str):
        def capture(_module, args, out) -> None:  # returns None: a returned value would replace out
            seen.setdefault(role, (args[0] if inputs else out).detach())

        return capture

    hooks = [module.register_forward_hook(hook(role)) for role, module in modules.items()]
    with torch.no_grad():
        model(IDS)
    for hook in hooks:
        hook.remove()
    return seen


def test_norm_roles_feed_the_right_linears(tiny):
    """"attn.pre" output is the q/qkv input; "mlp.pre" output is the gate/gate_up input (an MoE's:
    the router's and the fused experts' input)."""
    spec = arch_for(tiny)
    layer = decoder_layers(tiny)[1]
    norms = norm_modules(layer, spec)
    linears = linear_modules(layer, spec)
    if spec.moe is not None:
        linears.update({"mlp.gate": get_submodule(layer, spec.moe.experts), "router": get_submodule(layer, spec.moe.router)})
    norm_out = _captured(tiny.model, {k: norms[k] for k in ("attn.pre", "mlp.pre")}, inputs=False)
    first_q = "attn.qkv" if spec.fused_qkv else "attn.q"
    first_gate = "mlp.gate_up" if spec.fused_gate_up else "mlp.gate"
    linear_in = _captured(tiny.model, {k: linears[k] for k in (first_q, first_gate)}, inputs=True)
    torch.testing.assert_close(linear_in[first_q], norm_out["attn.pre"])
    torch.testing.assert_close(linear_in[first_gate].reshape(norm_out["mlp.pre"].shape), norm_out["mlp.pre"])
    if spec.moe is not None:
        router_in = _captured(tiny.model, {"router": linears["router"]}, inputs=True)["router"]
        torch.testing.assert_close(router_in.reshape(norm_out["mlp.pre"].shape), norm_out["mlp.pre"])


def test_norm_offset_matches_the_module(tiny):
    """With a zero weight, x * (offset + w) is 0 for Llama-style norms, the normalised x for Gemma."""
    spec = arch_for(tiny)
    norm = norm_modules(decoder_layers(tiny)[0], spec)["attn.pre"]
    x = torch.randn(2, 3, text_config(tiny).hidden_size)
    with torch.no_grad():
        saved = norm.weight.clone()
        norm.weight.zero_()
        out = norm(x)
        norm.weight.copy_(saved)
    normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, normalised * spec.norm_offset, atol=1e-4, rtol=1e-4)


def test_gemma3_multimodal_text_part():
    model = tiny_model("gemma3").model
    spec = arch_for(model)
    assert spec.family == "gemma3"
    layers = decoder_layers(model)
    assert len(layers) == model.config.text_config.num_hidden_layers
    assert set(linear_modules(layers[0], spec)) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    assert isinstance(get_submodule(model, spec.embed), nn.Embedding)
    assert embeddings_tied(model)


def test_qwen3_layout():
    model = tiny_model("qwen3").model
    spec = arch_for(model)
    assert set(norm_modules(decoder_layers(model)[0], spec)) >= {"attn.q_norm", "attn.k_norm"}


@pytest.mark.parametrize(
    ("model_type", "kwargs", "hint"),
    [
        ("t5", dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64), "encoder-decoder"),
        ("bart", dict(d_model=16, encoder_layers=1, decoder_layers=1, vocab_size=64), "encoder-decoder"),
        ("gpt2", dict(n_embd=16, n_layer=1, n_head=2, vocab_size=64), "gpt2"),
    ],
)
def test_unsupported_architectures_name_the_supported_ones(model_type, kwargs, hint):
    config = AutoConfig.for_model(model_type, **kwargs)
    with pytest.raises(UnsupportedArchitectureError) as error:
        arch_for(config)
    message = str(error.value)
    assert hint in message and "llama" in message and "gemma3_text" in message
    assert "\n" not in message


def test_set_submodule_swaps_a_linear():
    loaded = tiny_model("llama")
    spec = arch_for(loaded)
    replacement = nn.Linear(64, 64, bias=False)
    set_submodule(decoder_layers(loaded)[0], spec.q, replacement)
    assert linear_modules(decoder_layers(loaded)[0], spec)["attn.q"] is replacement
