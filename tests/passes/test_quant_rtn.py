"""quant.rtn on every tiny family: on-grid weights, save -> reload, GGUF grids, the group-size
fallback (named layers), the storage / export contract on the model, bad configs."""

from __future__ import annotations

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.compression import get_state
from kompakt.model.load import load
from kompakt.model.quantized import is_quantized
from kompakt.model.save import save_model
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.export.gguf_grid_recover import recover_blocks
from kompakt.ops.gguf_grid import dequantize_blocks, quantize_blocks
from kompakt.ops.quant import QuantGrid
from kompakt.passes.base import PassContext, build_config, get_pass

SPEC = get_pass("quant.rtn")
IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(loaded, **values):
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None, seed=0)
    return SPEC.apply(ctx, build_config(SPEC, values))


def _quantized_weights(loaded):
    modules = dict(loaded.model.named_modules())
    return {name: modules[name].weight for name in get_state(loaded).quantization.modules}


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rtn_every_family_on_grid_and_reloads(family, tmp_path):
    loaded = tiny_model(family)
    report = _run(loaded, bits=4, group_size=32)
    logits = _logits(loaded)
    assert torch.isfinite(logits).all()
    grid = QuantGrid(4, 32, True)
    weights = _quantized_weights(loaded)
    assert report.packed_layers.keys() == weights.keys() and weights  # the step saves these
    for name, w in weights.items():
        assert torch.equal(grid.fake_quantize(w.detach()), w.detach()), name  # re-quantizing changes nothing
        packed = report.packed_layers[name]
        assert torch.equal(packed.dequantize(), w.detach().float()), name
    assert "rtn int4 g32 sym" in report.summary
    reloaded = load(save_model(loaded, tmp_path / "q"))
    assert torch.equal(_logits(reloaded), logits)
    assert is_quantized(reloaded)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "iq4_nl"])
def test_gguf_format_is_llamacpp_rounding(fmt):
    loaded = tiny_model("llama")
    after, report = _quantized_weights_after(loaded, fmt)
    before = {n: w.detach().clone() for n, w in after.items()}
    meta = get_state(loaded).quantization
    assert meta.format == fmt and len(meta.modules) == 28
    for name, w in _quantized_weights(loaded).items():
        # on the grid (iq4_nl's scale search is no projection: re-running it may pick another d)
        q, d, m, missed = recover_blocks(w.detach(), fmt)
        assert missed == 0 and torch.equal(dequantize_blocks(q, d, m, fmt), w.detach()), name
        assert torch.equal(w.detach(), before[name])
    packed = report.packed_layers
    if fmt not in ("q4_0", "q8_0"):  # no compressed-tensors integer grid: the step stays dense
        assert packed == {}
    else:  # q4_0 / q8_0 are symmetric int4 / int8 groups of 32: stored packed, the same values
        weights = _quantized_weights(loaded)
        assert set(packed) == set(weights)
        assert all(torch.equal(layer.dequantize(), weights[name].detach()) for name, layer in packed.items())


def _quantized_weights_after(loaded, fmt):
    from kompakt.model.arch import arch_for, decoder_layers, linear_modules

    spec = arch_for(loaded.model)
    originals = {
        f"{spec.layers}.{i}.{spec.linear_paths[r]}": m.weight.detach().clone()
        for i, layer in enumerate(decoder_layers(loaded.model))
        for r, m in linear_modules(layer, spec).items()
    }
    report = _run(loaded, format=fmt)
    return {n: dequantize_blocks(*quantize_blocks(w, fmt), fmt) for n, w in originals.items()}, report


def test_asymmetric_per_channel_and_modules():
    loaded = tiny_model("qwen2")
    report = _run(loaded, bits=3, group_size=None, symmetric=False, modules=["mlp"])
    meta = get_state(loaded).quantization
    assert all("mlp" in n for n in meta.modules) and len(meta.modules) == 12
    grid = QuantGrid(3, None, False)
    for name, w in _quantized_weights(loaded).items():
        assert torch.allclose(grid.fake_quantize(w.detach()), w.detach(), atol=1e-6), name
        assert report.packed_layers[name].zero is not None


def test_group_fallback_names_the_layers(caplog):
    loaded = tiny_model("llama", intermediate_size=96)  # down_proj reads 96 = 3 x 32 inputs
    with caplog.at_level("WARNING"):
        report = _run(loaded, bits=4, group_size=64)
    assert "group size 64 does not divide 96: used 32" in report.summary
    assert "model.layers.0.mlp.down_proj" in report.summary and "(4 layers" in report.summary
    assert "down_proj" in caplog.text
    meta = get_state(loaded).quantization
    assert meta.group_sizes == {f"model.layers.{i}.mlp.down_proj": 32 for i in range(4)}
    assert report.packed_layers["model.layers.0.mlp.down_proj"].group_size == 32


def test_embeddings_and_lm_head_flags():
    loaded = tiny_model("llama")  # untied
    embed = loaded.model.model.embed_tokens.weight.detach().clone()
    _run(loaded, bits=8, group_size=32, lm_head=True)
    assert torch.equal(loaded.model.model.embed_tokens.weight, embed)  # off by default
    assert "lm_head" in get_state(loaded).quantization.modules
    loaded = tiny_model("llama")
    report = _run(loaded, bits=8, group_size=32, embeddings=True)
    assert not torch.equal(loaded.model.model.embed_tokens.weight, embed)
    assert "model.embed_tokens" not in report.packed_layers  # not a Linear


@pytest.mark.parametrize(
    "values, message",
    [
        ({"bits": 5}, "bits 5"),
        ({"bits": 16}, "bits 16"),
        ({"group_size": 48}, "group_size 48"),
        ({"format": "q7_0"}, "unknown GGUF type .q7_0."),
        ({"modules": ["attn.x"]}, "match no Linear"),
        ({"groupsize": 64}, "unknown field"),
    ],
)
def test_bad_configs(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(SPEC, values)


def test_quantizing_twice_is_refused(tmp_path):
    loaded = tiny_model("llama")
    _run(loaded, bits=4)
    with pytest.raises(ConfigError, match="already quantized"):
        _run(loaded, bits=4)
    reloaded = load(save_model(loaded, tmp_path / "q"))  # the mark survives save -> reload
    with pytest.raises(ConfigError, match="already quantized"):
        _run(reloaded, bits=8)


def test_passes_registered_with_their_needs():
    from kompakt.passes.base import registry

    passes = registry()
    assert not passes["quant.rtn"].needs_calibration
    assert passes["quant.gptq"].needs_calibration and passes["quant.awq"].needs_calibration
    for name in ("quant.rtn", "quant.gptq", "quant.awq"):
        assert "Sample recipe step" in passes[name].doc and not passes[name].changes_architecture
