"""LowRankLinear, its surgery and the loader that rebuilds a factorized model from its directory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kompakt.errors import ModelFormatError
from kompakt.model.compression import get_state
from kompakt.model.load import load
from kompakt.model.lowrank import LowRankLinear, factorize_linear, lowrank_modules, merge_lowrank
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model

UP = "model.layers.1.mlp.up_proj"
IDS = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def _factorize(loaded, name: str, rank: int = 8) -> LowRankLinear:
    linear = loaded.model.get_submodule(name)
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    return factorize_linear(loaded.model, name, up=u[:, :rank] * s[:rank], down=vh[:rank], method="plain")


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


def test_two_matmuls_with_the_bias_equal_the_dense_product():
    module = LowRankLinear(12, 20, 4, bias=True)
    dense = module.to_linear()
    x = torch.randn(3, 12)
    torch.testing.assert_close(module(x), dense(x))
    assert isinstance(module[0], nn.Linear) and module[0].bias is None and module[1].bias is not None
    assert (module.in_features, module.out_features, module.rank) == (12, 20, 4)


def test_save_load_rebuilds_the_factors_with_the_same_logits_and_parameters(tmp_path):
    loaded = tiny_model("qwen2")  # tied embeddings and q/k/v biases
    _factorize(loaded, UP)
    _factorize(loaded, "model.layers.0.self_attn.q_proj")  # has a bias: kept on the second factor
    save_model(loaded, tmp_path / "m")
    assert "model.layers.0.self_attn.q_proj.1.bias" in _stored_keys(tmp_path / "m")
    back = load(tmp_path / "m", device="cpu")
    assert type(back.model) is type(loaded.model) and set(lowrank_modules(back.model)) == set(get_state(loaded).lowrank)
    assert back.num_parameters() == loaded.num_parameters()
    torch.testing.assert_close(_logits(back), _logits(loaded))


def test_merge_gives_back_dense_linears_with_the_same_outputs():
    loaded = tiny_model("llama")
    before = loaded.num_parameters()
    module = _factorize(loaded, UP)
    assert loaded.num_parameters() == before - 128 * 64 + 8 * (128 + 64)
    logits = _logits(loaded)
    assert merge_lowrank(loaded.model) == [UP] and not get_state(loaded).lowrank
    assert type(loaded.model.get_submodule(UP)) is nn.Linear and loaded.num_parameters() == before
    torch.testing.assert_close(_logits(loaded), logits, rtol=1e-4, atol=1e-5)
    assert module.method == "plain"


@pytest.mark.parametrize(
    "entry, message",
    [({UP: {"rank": 8, "module": "TensorTrainLinear"}}, "module type 'TensorTrainLinear'.*does not know"),
     ({"model.layers.9.mlp.up_proj": {"rank": 8}}, "no module named"),
     ({UP: {"rank": "eight"}}, "malformed kompakt_lowrank"),
     ({UP: {"rank": 16}}, "cannot load .*copy or download the model again")],
)  # fmt: skip
def test_a_factorized_model_that_cannot_be_rebuilt_is_one_line(entry, message, tmp_path):
    loaded = tiny_model("llama")
    _factorize(loaded, UP)
    save_model(loaded, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["kompakt_lowrank"] = entry
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message) as info:
        load(tmp_path / "m", device="cpu")
    assert "\n" not in str(info.value)


def _stored_keys(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())
