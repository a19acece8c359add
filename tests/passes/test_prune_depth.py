"""prune.depth on every tiny family: every method removes the asked layers, scoring finds an
identity layer, bad counts are refused (save -> reload: tests/passes/test_pass_contract.py)."""

from __future__ import annotations

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, text_config
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

SPEC = get_pass("prune.depth")
BLOCKS = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))


def _run(loaded, **values):
    config = build_config(SPEC, values)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: BLOCKS, seed=0)
    return SPEC.apply(ctx, config)


def _make_identity(loaded, index: int) -> None:
    """Zero o_proj and down_proj of one layer: its output equals its input."""
    spec = arch_for(loaded.model)
    layer = decoder_layers(loaded.model)[index]
    with torch.no_grad():
        get_submodule(layer, spec.o).weight.zero_()
        get_submodule(layer, spec.down).weight.zero_()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_method_on_every_family(family):
    for method in ("block_influence", "angular", "kl", "last"):
        loaded = tiny_model(family)
        before = loaded.num_parameters()
        report = _run(loaded, count=2, method=method)
        model = report.loaded.model
        assert text_config(model).num_hidden_layers == 2 and len(decoder_layers(model)) == 2, method
        assert len(report.details["removed_layers"]) == 2
        assert report.loaded.num_parameters() < before
        with torch.no_grad():
            logits = model(input_ids=BLOCKS[:2]).logits
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["block_influence", "kl"])
def test_identity_layer_is_removed_first(family, method):
    loaded = tiny_model(family)
    _make_identity(loaded, 1)
    report = _run(loaded, count=1, method=method)
    assert report.details["removed_layers"] == [1]


def test_iterative_and_fraction():
    loaded = tiny_model("llama")
    _make_identity(loaded, 2)
    report = _run(loaded, fraction=0.5, method="kl", iterative=True)
    rounds = report.details["rounds"]
    assert len(rounds) == 2 and rounds[0]["removed"] == [2]  # the identity layer goes in the first round
    assert rounds[1]["removed"][0] != 2 and len(rounds[1]["scores"]) == 3  # then one of the 3 left, rescored
    assert sorted(rounds[0]["removed"] + rounds[1]["removed"]) == report.details["removed_layers"]
    assert text_config(report.loaded).num_hidden_layers == 2
    report = _run(tiny_model("qwen2"), fraction=0.25, iterative=True)  # 1 of 4 layers
    assert text_config(report.loaded).num_hidden_layers == 3


def test_angular_removes_a_contiguous_block_and_last_the_tail():
    report = _run(tiny_model("mistral"), count=2, method="angular")
    first, second = report.details["removed_layers"]
    assert second == first + 1
    assert _run(tiny_model("llama"), count=3, method="last").details["removed_layers"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"count": 4}, "cannot remove 4 of 4 layers"),
        ({"count": 9}, "cannot remove 9 of 4 layers"),
        ({"fraction": 0.1}, "removes no layer"),
    ],
)
def test_impossible_counts_are_config_errors(values, needle):
    with pytest.raises(ConfigError, match=needle):
        _run(tiny_model("llama"), **values)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({}, "exactly one of count or fraction"),
        ({"count": 0}, "count must be at least 1"),
        ({"fraction": 1.0}, "fraction must be in"),
        ({"count": 1, "method": "angular", "iterative": True}, "iterative applies to"),
        ({"count": 1, "method": "random"}, "unknown method"),
    ],
)
def test_bad_configs_fail_before_any_model(values, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(SPEC, values)
