"""prune.width on every tiny family: widths as asked, forward works, save -> reload same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from kompakt.errors import ConfigError
from kompakt.model.arch import decoder_layers, text_config
from kompakt.model.save import save_model
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

CALIBRATION = torch.randint(0, 260, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(1))
SPEC = get_pass("prune.width")


def _run(loaded, **values):
    ctx = PassContext(loaded=loaded, original=lambda: None, calibration=lambda: CALIBRATION, seed=0)
    return SPEC.apply(ctx, build_config(SPEC, values))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# config -> the tiny-model overrides that the pruned model must equal in shape
CASES = {
    "mlp_fraction": ({"mlp_fraction": 0.5}, {"intermediate_size": 64}),
    "mlp_channels": ({"mlp_channels": 40}, {"intermediate_size": 40}),
    "kv_groups": ({"kv_groups": 1}, {"num_attention_heads": 2, "num_key_value_heads": 1}),
    "attention_heads": ({"attention_heads": 2}, {"num_attention_heads": 2, "num_key_value_heads": 1}),
    "hidden_fraction": ({"hidden_fraction": 0.25}, {"hidden_size": 48}),
    "all": (
        {"mlp_fraction": 0.25, "heads_fraction": 0.5, "hidden_size": 40},
        {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 40},
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_width_pruning_contract(family, case, tmp_path):
    values, widths = CASES[case]
    loaded = tiny_model(family)
    report = _run(loaded, **values)
    assert report.loaded is loaded
    # a model built with these widths has exactly as many parameters as the pruned one
    assert loaded.num_parameters() == tiny_model(family, **widths).num_parameters()
    config = text_config(loaded)
    for key, value in widths.items():
        assert getattr(config, key) == value
    assert report.details["parameters"] == [tiny_model(family).num_parameters(), loaded.num_parameters()]
    logits = _logits(loaded.model)
    assert torch.isfinite(logits).all()
    reloaded = AutoModelForCausalLM.from_pretrained(save_model(loaded, tmp_path / "m"))
    torch.testing.assert_close(_logits(reloaded), logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_target_params_reaches_about_the_target(family, tmp_path):
    loaded = tiny_model(family)
    before = loaded.num_parameters()
    report = _run(loaded, target_params=0.5, round_to=8)
    assert abs(loaded.num_parameters() / before - 0.5) < 0.05
    assert text_config(loaded).intermediate_size < 128 and text_config(loaded).hidden_size < 64
    assert "parameters" in report.summary
    reloaded = AutoModelForCausalLM.from_pretrained(save_model(loaded, tmp_path / "m"))
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)


def test_target_params_respects_head_divisibility(tmp_path):
    # SmolLM2-like: 9 heads / 3 KV heads; Llama configs need hidden_size % 9 == 0
    widths = dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8, intermediate_size=192)
    loaded = tiny_model("llama", **widths)
    before = loaded.num_parameters()
    _run(loaded, target_params=0.6)
    config = loaded.model.config
    assert config.hidden_size % 9 == 0 and config.hidden_size < 72
    assert abs(loaded.num_parameters() / before - 0.6) < 0.05
    reloaded = AutoModelForCausalLM.from_pretrained(save_model(loaded, tmp_path / "m"))
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)


def _unequal_channels_model():
    """Half the MLP channels of every layer carry 30x larger activations than the other half."""
    loaded = tiny_model("llama", seed=3)
    strong = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64]
    scale = torch.full((128, 1), 0.2)
    scale[strong] = 6.0
    for layer in decoder_layers(loaded.model):
        layer.mlp.up_proj.weight.data *= scale
    return loaded, strong


def _kl_to(reference: torch.Tensor, loaded) -> float:
    logits = _logits(loaded.model)
    return F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()


def test_activation_ranking_hurts_less_than_random():
    reference = _logits(_unequal_channels_model()[0].model)
    by_activation, strong = _unequal_channels_model()
    _run(by_activation, mlp_fraction=0.5, importance="activation")
    by_random, _ = _unequal_channels_model()
    _run(by_random, mlp_fraction=0.5, importance="random")
    kept = torch.sort(torch.as_tensor(strong)).values
    # the activation ranking keeps exactly the strong channels
    original_up = _unequal_channels_model()[0].model.model.layers[0].mlp.up_proj.weight.data
    torch.testing.assert_close(by_activation.model.model.layers[0].mlp.up_proj.weight.data, original_up[kept])
    assert _kl_to(reference, by_activation) < 0.5 * _kl_to(reference, by_random)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mlp_fraction": 1.0}, r"mlp_fraction must be in \[0, 1\)"),
        ({"hidden_fraction": -0.1}, r"hidden_fraction must be in \[0, 1\)"),
        ({"heads_fraction": 1.5}, r"heads_fraction must be in \[0, 1\)"),
        ({"kv_groups": 0}, "kv_groups must be an integer >= 1"),
        ({"kv_groups": 1.5}, "expected"),
        ({"mlp_fraction": 0.5, "mlp_channels": 10}, "only one of"),
        ({"kv_groups": 1, "heads_fraction": 0.5}, "only one of"),
        ({"target_params": 0.5, "mlp_fraction": 0.5}, "target_params chooses"),
        ({"target_params": 1.0}, r"target_params must be in \(0, 1\)"),
        ({}, "say what to cut"),
        ({"mlp_fraction": 0.5, "importance": "taylor"}, "unknown importance"),
        ({"mlp_fraction": 0.5, "bogus": 1}, "unknown field"),
    ],
)
def test_bad_configs_fail_before_loading(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(SPEC, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"attention_heads": 3}, "breaks GQA grouping; use a multiple of 2"),
        ({"kv_groups": 3}, "exceeds the model's 2"),
        ({"mlp_channels": 500}, "exceeds the model's 128"),
        ({"target_params": 0.01}, "below what width pruning reaches"),
        ({"target_params": 0.01, "kv_groups": 1}, "below what width pruning reaches"),
        ({"hidden_size": 30}, "not a multiple of the number of attention heads"),
    ],
)
def test_bad_widths_for_the_model_are_config_errors(values, message):
    loaded = tiny_model("llama")
    with pytest.raises(ConfigError, match=message):
        _run(loaded, **values)
    assert loaded.num_parameters() == tiny_model("llama").num_parameters()  # nothing was cut


def test_registered_with_doc():
    assert SPEC.needs_calibration and SPEC.changes_architecture
    assert "Minitron" in SPEC.doc and "prune.width: {mlp_fraction: 0.5}" in SPEC.doc
