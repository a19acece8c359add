"""prune.sparse on every tiny family: methods, exact sparsity / N:M patterns, quality order
(SparseGPT <= Wanda <= magnitude), OWL, the gradual schedule, bad configs (save -> reload:
tests/passes/test_pass_contract.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, linear_modules, norm_modules
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.passes.prune_sparse import owl_sparsities, outlier_ratio, scheduled_sparsity

SPEC = get_pass("prune.sparse")
_GEN = torch.Generator().manual_seed(1)
CALIB = torch.randint(0, 256, (16, 64), generator=_GEN)
HELDOUT = torch.randint(0, 256, (8, 64), generator=_GEN)
METHODS = ("magnitude", "wanda", "sparsegpt")
OUTLIER_CHANNELS = [3, 17, 30, 45]  # in different groups of 4 and 8, so N:M can keep them


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(loaded, **values):
    config = build_config(SPEC, values)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIB, seed=0)
    return SPEC.apply(ctx, config)


def _pruned_weights(model):
    spec = arch_for(model)
    return [m.weight for layer in decoder_layers(model) for m in linear_modules(layer, spec).values()]


def _with_outliers(loaded):
    """Give 4 hidden channels 8x larger pre-norm gains: outlier input features, as in real LLMs."""
    spec = arch_for(loaded.model)
    with torch.no_grad():
        for layer in decoder_layers(loaded.model):
            for role, norm in norm_modules(layer, spec).items():
                if role in ("attn.pre", "mlp.pre"):
                    norm.weight[OUTLIER_CHANNELS] = (norm.weight[OUTLIER_CHANNELS] + spec.norm_offset) * 8 - spec.norm_offset
    return loaded


def _kl(reference, candidate) -> float:
    with torch.no_grad():
        ref = F.log_softmax(reference.model(input_ids=HELDOUT).logits, -1)
        cand = F.log_softmax(candidate.model(input_ids=HELDOUT).logits, -1)
    return float(F.kl_div(cand, ref, log_target=True, reduction="sum") / (HELDOUT.numel()))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_on_every_family(family, method):
    loaded = tiny_model(family)
    embed_before = get_submodule(loaded.model, arch_for(loaded.model).embed).weight.clone()
    weights_before = [w.detach().clone() for w in _pruned_weights(loaded.model)]
    report = _run(loaded, method=method, sparsity=0.5)
    model = report.loaded.model
    for weight, before in zip(_pruned_weights(model), weights_before, strict=True):
        assert int((weight == 0).sum()) == weight.numel() // 2  # exact per matrix
        kept = weight != 0  # magnitude and Wanda only mask; SparseGPT also updates what it keeps
        assert torch.equal(weight[kept], before[kept]) == (method != "sparsegpt"), method
    assert report.details["achieved_sparsity"] == pytest.approx(0.5)
    torch.testing.assert_close(get_submodule(model, arch_for(model).embed).weight, embed_before)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=HELDOUT[:2]).logits).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_nm_pattern_on_every_family(family, method, nm):
    n, m = (int(p) for p in nm.split(":"))
    report = _run(tiny_model(family), method=method, nm=nm)
    for weight in _pruned_weights(report.loaded.model):
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all())  # exactly n kept (non-zero) weights in every group of m
    with torch.no_grad():
        assert torch.isfinite(report.loaded.model(input_ids=HELDOUT[:2]).logits).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"nm": "2:4"}])
def test_sparsegpt_beats_wanda_beats_magnitude(family, pattern):
    kl = {}
    for method in METHODS:
        reference = _with_outliers(tiny_model(family, seed=0))
        candidate = _with_outliers(tiny_model(family, seed=0))
        _run(candidate, method=method, **pattern)
        kl[method] = _kl(reference, candidate)
    assert kl["sparsegpt"] < kl["wanda"] < kl["magnitude"], kl


def test_modules_select_roles():
    loaded = tiny_model("llama")
    report = _run(loaded, method="wanda", sparsity=0.5, modules="mlp")
    spec = arch_for(loaded.model)
    for role, module in linear_modules(decoder_layers(loaded.model)[0], spec).items():
        zeros = int((module.weight == 0).sum())
        assert (zeros == module.weight.numel() // 2) == role.startswith("mlp."), role
    assert len(report.details["linears"]) == 4 * 3


def test_owl_layer_sparsities():
    ratios = [0.01, 0.03, 0.02, 0.05]
    sparsities = owl_sparsities(ratios, 0.6, 0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.6)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert sparsities.index(min(sparsities)) == 3  # most outliers -> least pruned
    assert owl_sparsities([0.02] * 3, 0.5, 0.08) == [0.5] * 3
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 100.0])], 2.0) == 0.25

    loaded = _with_outliers(tiny_model("llama"))
    report = _run(loaded, method="wanda", sparsity=0.5, owl=True, owl_m=3.0)
    layer_sparsity = report.details["layer_sparsity"]
    assert sum(layer_sparsity) / len(layer_sparsity) == pytest.approx(0.5)
    assert len(report.details["owl_outlier_ratios"]) == 4
    for index, layer in enumerate(decoder_layers(loaded.model)):
        for module in linear_modules(layer, arch_for(loaded.model)).values():
            row = module.weight[0]
            assert int((row == 0).sum()) == int(row.numel() * layer_sparsity[index])  # Wanda: per row


def test_gradual_schedule_reaches_the_target():
    config = build_config(SPEC, {"sparsity": 0.8, "steps": 4, "step": 1})
    steps = [scheduled_sparsity(build_config(SPEC, {"sparsity": 0.8, "steps": 4, "step": k})) for k in (1, 2, 3, 4)]
    assert steps[-1] == pytest.approx(0.8) and steps == sorted(steps)
    assert scheduled_sparsity(config) == pytest.approx(0.8 * (1 - 0.75**3))
    loaded = tiny_model("llama")
    achieved = []
    for k in (1, 2, 3):
        report = _run(loaded, method="magnitude", sparsity=0.6, steps=3, step=k)
        achieved.append(report.details["achieved_sparsity"])
    assert achieved == sorted(achieved) and achieved[-1] == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize(
    "values",
    [
        {"sparsity": 1.0}, {"sparsity": -0.1}, {"nm": "4:2"}, {"nm": "2-4"}, {"nm": "2:4", "sparsity": 0.5},
        {"nm": "2:4", "owl": True}, {"method": "obs"}, {"modules": "attn,embed"}, {"step": 3, "steps": 2},
        {"sparsity": 0.5, "initial_sparsity": 0.7}, {"lm_head": True},
    ],
)  # fmt: skip
def test_bad_configs_fail_before_loading(values):
    with pytest.raises(ConfigError):
        build_config(SPEC, values)


def test_nm_must_divide_every_input_width():
    loaded = tiny_model("llama", intermediate_size=120)  # down_proj input 120: not a multiple of 16
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj"):
        _run(loaded, method="wanda", nm="8:16")
    report = _run(tiny_model("llama", intermediate_size=120), method="wanda", nm="8:16", modules="attn")
    assert report.details["achieved_sparsity"] == pytest.approx(0.5)


def test_modules_that_match_nothing_name_the_family():
    with pytest.raises(ConfigError, match="phi3"):
        _run(tiny_model("phi3"), method="magnitude", modules="attn.q")


def test_unquoted_nm_in_yaml_says_to_quote_it():
    from kompakt.errors import ConfigError
    from kompakt.recipe.schema import Recipe

    with pytest.raises(ConfigError, match="quote"):
        Recipe.from_yaml("steps:\n  - prune.sparse: {nm: 2:4}\n").validate()
