"""Quantization sensitivity quantizes a layer exactly as quant.rtn would; one disk-bytes count."""

from __future__ import annotations

import pytest
import torch

from kompakt.analyze.breakdown import breakdown
from kompakt.evaluate import disk_bytes
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.model.quantized import storage_grid
from kompakt.passes.quant_common import QuantGridConfig, plan_grid
from kompakt.scoring.quant_sensitivity import quant_sensitivity, quantized_layer
from kompakt.scoring.reference import build_reference


@pytest.mark.parametrize(
    ("in_features", "group_size", "used"),
    [
        (576, 128, 64),  # SmolLM2: the largest power-of-two divisor below 128
        (576, 64, 64),
        (64, 48, 32),
        (100, 64, None),  # no power-of-two divisor >= 8: one scale per output channel
        (64, 128, None),  # a group wider than the row is one scale per row
        (64, None, None),
        (64, 0, None),
    ],
)
def test_group_fallback_is_quant_rtns(in_features, group_size, used):
    grid = storage_grid(in_features, 4, group_size)
    assert grid.group_size == used and grid.scale_dtype == torch.float16
    plan = plan_grid(QuantGridConfig(bits=4, group_size=group_size or None), in_features)
    assert plan.grid == grid and plan.group_size == used


@pytest.mark.parametrize("group_size", [64, None])
def test_quantized_layer_equals_quant_rtn_on_that_layer(group_size):
    # hidden 96: q/k/v/gate/up (96 inputs) fall back from 64 to 32; o (64 inputs) is one group
    # per row, i.e. per channel; down (128 inputs) keeps 64
    widths = dict(hidden_size=96, head_dim=16)
    probe, rtn = tiny_model("llama", **widths), tiny_model("llama", **widths)
    spec = arch_for(probe.model)
    pass_spec = get_pass("quant.rtn")
    ctx = PassContext(loaded=rtn, original=lambda: rtn, calibration=lambda: None, seed=0)
    pass_spec.apply(ctx, build_config(pass_spec, {"bits": 4, "group_size": group_size}))
    layer, done = decoder_layers(probe.model)[1], linear_modules(decoder_layers(rtn.model)[1], spec)
    with quantized_layer(layer, spec, bits=4, group_size=group_size) as used:
        for role, linear in linear_modules(layer, spec).items():
            torch.testing.assert_close(linear.weight, done[role].weight, rtol=0, atol=0)
    if group_size:
        assert used == {"attn.q": 32, "attn.k": 32, "attn.v": 32, "attn.o": None, "mlp.gate": 32, "mlp.up": 32, "mlp.down": 64}


def test_sensitivity_notes_name_the_fallback():
    loaded = tiny_model("llama", hidden_size=96, head_dim=16)
    model, spec, layers = loaded.model, arch_for(loaded.model), decoder_layers(loaded.model)
    windows = [torch.randint(0, 261, (1, 16), generator=torch.Generator().manual_seed(0))]
    scores, notes = quant_sensitivity(model, layers, spec, build_reference(model, layers, windows), group_size=64)
    assert len(scores) == 4 and all(s.kl_mean > 0 for s in scores)
    assert notes == [
        "group size 64 does not divide the input width of every Linear; used instead, as quant.rtn does: "
        "attn.k, attn.q, attn.v, mlp.gate, mlp.up: 32"
    ]
    assert quant_sensitivity(model, layers, spec, build_reference(model, layers, windows), group_size=32)[1] == []


def test_analysis_counts_disk_bytes_as_evaluate_does(tmp_path):
    loaded = tiny_model("llama")
    loaded.path = save_model(loaded, tmp_path / "m")
    assert breakdown(loaded).disk_bytes == disk_bytes(loaded.path) > 0
    assert breakdown(tiny_model("llama")).disk_bytes is None
