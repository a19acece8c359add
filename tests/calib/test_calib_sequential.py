"""The calibration driver: capture, layer-by-layer reproduction of the forward, statistics, groups."""

from __future__ import annotations

import pytest
import torch

from kompakt.calib import (
    capture_layer_inputs,
    collect_stats,
    run_layer,
    run_sequential,
    sequential_groups,
)
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import TINY_FAMILIES, tiny_model

# 96 tokens > the tiny Gemma / Mistral sliding window (64), so sliding and full masks differ;
# 5 blocks in batches of 2 give two batch shapes (2 and 1).
BLOCKS = torch.randint(0, 256, (5, 96), generator=torch.Generator().manual_seed(0))
# Alternating layer types exercise per-type masks and (Gemma 3) per-type rotary embeddings.
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
OVERRIDES = {"gemma3_text": {"layer_types": MIXED}, "mistral": {"sliding_window": 64}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str):
    return tiny_model(family, **OVERRIDES.get(family, {})).model


def _reference_states(model) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each layer's input and the last layer's output in a plain forward of BLOCKS (same batches)."""
    layers = decoder_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {}
    last: list[torch.Tensor] = []

    def pre(index):
        return lambda module, args, kwargs: inputs.setdefault(index, []).append(args[0].clone())

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: last.append(out if torch.is_tensor(out) else out[0])))
    try:
        with torch.no_grad():
            for batch in BLOCKS.split(2):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(v) for i, v in inputs.items()}, torch.cat(last)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_sequential_reproduces_the_forward(family):
    model = _model(family)
    expected, last = _reference_states(model)
    seen: dict[int, torch.Tensor] = {}
    calls: list[tuple[int, tuple[str, ...]]] = []

    def process(index, layer, stats):
        calls.append((index, tuple(stats)))
        if stats.group_index == 0:
            seen[index] = torch.cat(stats.inputs)

    result = run_sequential(model, BLOCKS, process, batch_size=2)
    for index, states in expected.items():
        torch.testing.assert_close(seen[index], states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(result.outputs), last, rtol=1e-5, atol=1e-5)
    assert result.n_samples == BLOCKS.shape[0]
    roles = list(linear_modules(decoder_layers(model)[0], arch_for(model)))
    assert [group for i, group in calls if i == 0] == sequential_groups(roles)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen2"])
def test_captured_kwargs_follow_layer_types(family):
    model = _model(family)
    captured = capture_layer_inputs(model, BLOCKS, batch_size=2)
    assert sorted(captured.calls) == [(1, 96), (2, 96)]
    assert len(captured.hidden) == 3
    layers = decoder_layers(model)
    states = captured.hidden[0]
    for index, layer in enumerate(layers):
        states = run_layer(layer, index, captured, [states])[0]
    _, last = _reference_states(model)
    torch.testing.assert_close(states, last[:2], rtol=1e-5, atol=1e-5)


def test_statistics_match_the_linear_inputs():
    model = _model("llama")
    captured = capture_layer_inputs(model, BLOCKS, batch_size=2)
    layer = decoder_layers(model)[0]
    linears = linear_modules(layer, arch_for(model))
    recorded: list[torch.Tensor] = []
    handle = linears["mlp.down"].register_forward_pre_hook(lambda m, a: recorded.append(a[0].reshape(-1, a[0].shape[-1])))
    run_layer(layer, 0, captured, captured.hidden)
    handle.remove()
    x = torch.cat(recorded).double()  # [tokens, in]
    stats = collect_stats(layer, 0, captured, captured.hidden, {"mlp.down": linears["mlp.down"]}, collect=("hessian", "inputs"))
    down = stats["mlp.down"]
    assert down.n_samples == x.shape[0] == 5 * 96
    torch.testing.assert_close(down.hessian().double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(down.column_norms().double(), x.norm(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(down.mean_abs().double(), x.abs().mean(0), rtol=1e-4, atol=1e-6)
    assert len(down.inputs) == 3


def test_true_sequential_sees_earlier_changes():
    """With true-sequential, o_proj's statistics come from the layer after q/k/v were changed."""
    model = _model("llama")
    before: dict[str, torch.Tensor] = {}

    def zero_qkv(index, layer, stats):
        if index == 0 and "attn.v" in stats:
            for stat in stats.values():
                stat.module.weight.data.zero_()
        if index == 0 and "attn.o" in stats:
            before["o"] = stats["attn.o"].column_norms()

    run_sequential(model, BLOCKS, zero_qkv, roles=["attn.q", "attn.k", "attn.v", "attn.o"])
    assert float(before["o"].abs().max()) == 0.0  # v = 0 -> the attention output is 0

    model = _model("llama")
    run_sequential(model, BLOCKS, zero_qkv, roles=["attn.q", "attn.k", "attn.v", "attn.o"], true_sequential=False)
    assert float(before["o"].abs().max()) > 0.0


def test_groups():
    assert sequential_groups(["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]) == [
        ("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.gate", "mlp.up"), ("mlp.down",),
    ]  # fmt: skip
    assert sequential_groups(["attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"], true_sequential=False) == [
        ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    ]
    assert sequential_groups(["mlp.down", "attn.o"]) == [("attn.o",), ("mlp.down",)]


def test_only_layers_calibrates_those_and_stops_after_the_last():
    """only_layers={1}: layer 1 alone is processed, with the statistics a full run gives it, and
    the driver stops there (its outputs are layer 1's, not the last layer's)."""
    model = _model("llama")
    expected, _ = _reference_states(model)
    hessians: dict[int, torch.Tensor] = {}

    def process(index, layer, stats):
        hessians[index] = stats["mlp.down"].hessian()

    run_sequential(model, BLOCKS, process, roles=["mlp.down"], batch_size=2)
    full, hessians = hessians, {}
    result = run_sequential(model, BLOCKS, process, roles=["mlp.down"], batch_size=2, only_layers={1})
    assert sorted(hessians) == [1] and len(full) == len(decoder_layers(model)) > 2
    torch.testing.assert_close(hessians[1], full[1])
    torch.testing.assert_close(torch.cat(result.outputs), expected[2], rtol=1e-5, atol=1e-5)
