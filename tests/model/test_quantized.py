"""compressed-tensors storage: packed integers + scales on disk, exact reload, small files."""

from __future__ import annotations

import json

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.compression import PackedLayer
from kompakt.model.quantized import ensure_not_quantized, is_quantized, save_quantized, storable_group_size
from kompakt.model.tiny import tiny_model
from kompakt.ops.quant import QuantGrid

pytest.importorskip("compressed_tensors")
IDS = torch.randint(0, 261, (1, 20), generator=torch.Generator().manual_seed(0))


def _quantize(loaded, grid_for) -> dict[str, PackedLayer]:
    """RTN-quantize every decoder Linear in place (as a quant pass would) and return the packed layers."""
    packed = {}
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layer = PackedLayer.from_grid(module.weight.data, grid_for(name))
            module.weight.data = layer.dequantize()
            packed[name] = layer
    return packed


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("asymmetric_k", [False, True])
def test_reload_gives_identical_logits(tmp_path, monkeypatch, asymmetric_k):
    from transformers import AutoModelForCausalLM

    from kompakt.model.load import load

    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    loaded = tiny_model("llama")
    packed = _quantize(loaded, lambda n: QuantGrid(4, 64 if "down" in n else 32, symmetric=not (asymmetric_k and "k_proj" in n)))
    result = save_quantized(loaded, tmp_path / "q", packed)
    assert result.layers == len(packed) and result.regrouped == {}
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("mixed-precision" if asymmetric_k else "pack-quantized")
    ref = _logits(loaded.model)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)), ref)
    back = load(tmp_path / "q", device="cpu")
    assert torch.equal(_logits(back.model), ref)
    assert is_quantized(back)
    with pytest.raises(ConfigError, match="already quantized"):
        ensure_not_quantized(back)


def test_four_bit_layers_take_an_eighth_of_fp32(tmp_path):
    from safetensors import safe_open

    loaded = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    packed = _quantize(loaded, lambda n: QuantGrid(4, 128))
    save_quantized(loaded, tmp_path / "q", packed)
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        down = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.mlp.down_proj.")}
    stored = sum(t.numel() * t.element_size() for t in down.values())
    fp16 = 256 * 512 * 2
    assert stored <= fp16 / 4 * 1.1  # 4-bit codes + one fp32 scale per 128 weights (+ shape)


def test_non_dividing_group_is_regrouped_and_reported(tmp_path, caplog):
    loaded = tiny_model("llama", intermediate_size=96)  # down_proj has 96 inputs: 64 does not divide
    grid = QuantGrid(4, 64, allow_partial_group=True)
    packed = _quantize(loaded, lambda n: grid)
    result = save_quantized(loaded, tmp_path / "q", packed)
    assert set(result.regrouped) == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    assert set(result.regrouped.values()) == {32}
    assert "does not divide 96" in caplog.text


def test_storable_group_size():
    assert storable_group_size(576, 128) == 64
    assert storable_group_size(1536, 128) == 128
    assert storable_group_size(576, None) is None
    assert storable_group_size(100, 64) is None  # no power-of-two divisor >= 8: per channel


def test_unknown_module_is_a_config_error(tmp_path):
    loaded = tiny_model("llama")
    layer = PackedLayer.from_grid(torch.zeros(4, 32), QuantGrid(4, 32))
    with pytest.raises(ConfigError, match="not a Linear"):
        save_quantized(loaded, tmp_path / "q", {"model.nothing": layer})


def test_tied_embeddings_are_stored_once_in_the_storage_dtype(tmp_path):
    from safetensors import safe_open

    loaded = tiny_model("qwen2")  # tie_word_embeddings=True
    loaded.storage_dtype = torch.float16
    save_quantized(loaded, tmp_path / "q", _quantize(loaded, lambda n: QuantGrid(4, 32)))
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    assert "lm_head.weight" not in keys
