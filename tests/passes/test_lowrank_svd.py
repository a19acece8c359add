"""lowrank.svd on tiny models: the budget, what it reports, what may follow it, and bad input.

Save -> kompakt.load -> same logits over every family is the pass-contract test's; the math
(error = discarded singular values, svd-llm <= asvd <= plain) is tests/ops/test_ops_svd.py's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kompakt
from kompakt.errors import ConfigError
from kompakt.model.compression import get_state
from kompakt.model.lowrank import LowRankLinear, lowrank_modules
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.rundir.stepsave import save_step_model

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = torch.randint(3, 250, (8, 64), generator=torch.Generator().manual_seed(0))
IDS = BLOCKS[:2, :24]


@pytest.fixture(scope="module")
def original():
    return tiny_model("llama")


def _run(name: str, loaded, original, **values):
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: original, calibration=lambda: BLOCKS)
    return spec.apply(ctx, build_config(spec, values))


def _factorized(original, **values):
    values.setdefault("target_params", 0.3)
    return _run("lowrank.svd", copy.deepcopy(original), original, **values)


def _linear_params(loaded) -> int:
    return sum(p.numel() for name, p in loaded.model.named_parameters() if ".layers." in name and "proj" in name)


@pytest.mark.parametrize("method", ["plain", "asvd", "svd-llm"])
def test_the_budget_is_met_and_counted_with_the_factors(method, original):
    report = _factorized(original, method=method)
    loaded, details = report.loaded, report.details
    before, after = details["linear_params"]
    assert before == _linear_params(original) and after == _linear_params(loaded)  # factors counted
    assert details["removed_params"] >= 0.3 and 1 - after / before == pytest.approx(details["removed_params"])
    assert loaded.num_parameters() == original.num_parameters() - (before - after)
    modules = lowrank_modules(loaded.model)
    assert len(modules) == details["factorized"] > 0
    assert all(m.rank % 8 == 0 and m.rank < m.in_features * m.out_features / (m.in_features + m.out_features)
               for m in modules.values())  # fmt: skip
    assert {n: (e.rank, e.method) for n, e in get_state(loaded).lowrank.items()} == {
        n: (m.rank, method) for n, m in modules.items()
    }
    if details["dense"]:  # kept dense: named with the reason
        assert "break-even" in report.summary and all("break-even" in why for why in details["dense_why"].values())


def test_svd_llm_loses_less_than_plain_on_the_calibration_data(original):
    losses = {m: _factorized(original, method=m).details["mean_truncation_loss"] for m in ("plain", "svd-llm")}
    assert losses["svd-llm"] < losses["plain"]


def test_targets_limit_what_is_factorized(original):
    report = _factorized(original, target_params=0.1, targets=["*.mlp.*"])
    assert report.details["factorized"] and all(".mlp." in n for n in lowrank_modules(report.loaded.model))


@pytest.mark.parametrize(
    "values, message",
    [({"target_params": 0.0}, "in \\(0, 1\\)"), ({"target_params": 1.0}, "in \\(0, 1\\)"),
     ({"method": "tucker"}, "plain, asvd, svd-llm"), ({"targets": ["*.nothing"]}, "match no decoder Linear"),
     ({"target_params": 0.9}, "cannot be met without exceeding dense"),
     ({"target_params": 0.2, "targets": ["*.k_proj"]}, "cannot be met without exceeding dense")],
)  # fmt: skip
def test_bad_input_is_one_line(values, message, original):
    with pytest.raises(ConfigError, match=message) as info:
        _factorized(original, **values)
    assert "\n" not in str(info.value)


def test_refuses_a_factorized_or_quantized_model(original):
    factorized = _factorized(original).loaded
    with pytest.raises(ConfigError, match="already factorized"):
        _run("lowrank.svd", factorized, original, target_params=0.2)
    quantized = _run("quant.rtn", copy.deepcopy(original), original, bits=8).loaded
    with pytest.raises(ConfigError, match="factorize first"):
        _run("lowrank.svd", quantized, original, target_params=0.2)


def test_gptq_quantizes_the_factors_and_the_packed_step_reloads(original, tmp_path):
    factorized = _factorized(original).loaded
    report = _run("quant.gptq", factorized, original, bits=4, group_size=32)
    factor_names = {f"{n}.{i}" for n in lowrank_modules(factorized.model) for i in (0, 1)}
    assert factor_names <= set(report.packed_layers) and factor_names <= set(get_state(report.loaded).quantization.modules)
    save_step_model(report.loaded, tmp_path / "step", torch.float32, report.packed_layers)
    reloaded = kompakt.load(tmp_path / "step", device="cpu")
    assert isinstance(reloaded.model.get_submodule(next(iter(lowrank_modules(factorized.model)))), LowRankLinear)
    with torch.no_grad():
        expected, got = report.loaded.model(input_ids=IDS).logits, reloaded.model(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


def test_what_may_follow_and_what_refuses(original, tmp_path):
    """Depth pruning renumbers layers (the state follows the modules); AWQ's scales and width
    pruning's slices cannot pass through a factor's rank, so they refuse in one line."""
    factorized = _factorized(original).loaded
    with pytest.raises(ConfigError, match="quant.gptq or quant.rtn"):
        _run("quant.awq", copy.deepcopy(factorized), original, bits=4, group_size=32)
    with pytest.raises(ConfigError, match="LowRankLinear, not a Linear"):
        _run("prune.width", copy.deepcopy(factorized), original, mlp_fraction=0.25)
    shallower = _run("prune.depth", factorized, original, fraction=0.25, method="last").loaded
    save_step_model(shallower, tmp_path / "step", torch.float32, {})
    reloaded = kompakt.load(tmp_path / "step", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=IDS).logits, shallower.model(input_ids=IDS).logits)
