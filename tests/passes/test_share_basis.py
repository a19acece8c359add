"""share.basis on tiny models: one tensor per shared basis (counted, saved, reloaded, trained once),
lower calibration loss than per-layer SVD-LLM where layers are alike, export, and bad input.

Save -> kompakt.load -> same logits over every family is also the pass-contract test's; the math
is tests/ops/test_ops_basis.py's.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

import kompakt
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, linear_modules
from kompakt.model.compression import get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.lowrank import LowRankLinear
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = torch.randint(3, 250, (8, 64), generator=torch.Generator().manual_seed(0))
IDS = BLOCKS[:2, :24]


def _alike(noise: float = 0.05) -> LoadedModel:
    """A tiny llama whose layers are near copies of layer 0 (as adjacent layers of a pretrained
    model are alike in the subspaces they use), each Linear with a decaying spectrum."""
    loaded = tiny_model("llama", seed=1)
    spec, layers = arch_for(loaded.model), decoder_layers(loaded.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for role, first in linear_modules(layers[0], spec).items():
            out_features, in_features = first.weight.shape
            u, _, vh = torch.linalg.svd(first.weight, full_matrices=False)
            first.weight.copy_(u @ torch.diag(torch.logspace(0, -1.5, len(vh))) @ vh * 0.5)
            for layer in layers[1:]:
                other = linear_modules(layer, spec)[role]
                other.weight.copy_(first.weight + noise * 0.5 / in_features**0.5 *
                                   torch.randn(out_features, in_features, generator=gen))  # fmt: skip
    return loaded


def _run(name: str, original: LoadedModel, **values):
    loaded = copy.deepcopy(original)
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: original, calibration=lambda: BLOCKS, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _logits(loaded: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


def _factorized_path(loaded: LoadedModel) -> str:
    """The path (within a layer) of the first Linear role layer 0 has factorized."""
    spec = arch_for(loaded.model)
    layer = decoder_layers(loaded.model)[0]
    return next(p for p in spec.linear_paths.values() if isinstance(get_submodule(layer, p), LowRankLinear))


def _linear_params(loaded: LoadedModel) -> int:
    """Decoder Linear parameters, each shared tensor once."""
    seen = {id(p): p.numel() for name, p in loaded.model.named_parameters() if ".layers." in name and "proj" in name}
    return sum(seen.values())


@pytest.fixture(scope="module")
def alike() -> LoadedModel:
    return _alike()


@pytest.mark.parametrize("side, factor", [("in", 0), ("out", 1)])
def test_a_shared_basis_is_one_parameter_counted_saved_and_reloaded_once(alike, side, factor, tmp_path):
    report = _run("share.basis", alike, target_params=0.3, group_sizes=[2], side=side)
    loaded = report.loaded
    path = _factorized_path(loaded)
    m0, m1, m2 = (get_submodule(layer, path) for layer in decoder_layers(loaded.model)[:3])
    assert isinstance(m1, LowRankLinear) and isinstance(m2, LowRankLinear)
    assert m1[factor].weight is m0[factor].weight and m2[factor].weight is not m0[factor].weight
    assert m1[1 - factor].weight is not m0[1 - factor].weight  # each layer keeps its coefficients
    before, after = report.details["linear_params"]
    assert after == _linear_params(loaded) and before == _linear_params(alike) and 1 - after / before >= 0.3
    assert alike.num_parameters() - loaded.num_parameters() == before - after
    owner, user = f"model.layers.0.{path}.{factor}", f"model.layers.1.{path}.{factor}"
    assert get_state(loaded).shared[owner].users == (user,)
    save_model(loaded, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{owner}.weight" in keys and f"{user}.weight" not in keys
    assert f"model.layers.1.{path}.{1 - factor}.weight" in keys
    reloaded = kompakt.load(tmp_path / "m", device="cpu")
    r0, r1 = (get_submodule(layer, path) for layer in decoder_layers(reloaded.model)[:2])
    assert r1[factor].weight is r0[factor].weight
    assert reloaded.num_parameters() == loaded.num_parameters()
    torch.testing.assert_close(_logits(reloaded), _logits(loaded), rtol=0, atol=1e-5)


def _whitened_loss(original: LoadedModel, result: LoadedModel) -> float:
    """Σ over decoder Linears of ‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖² on the original model's calibration inputs."""
    spec = arch_for(original.model)
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(decoder_layers(original.model)):
        for role, module in linear_modules(layer, spec).items():
            key = f"{index}.{role}"

            def hook(_module, args, _out, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        original.model(input_ids=BLOCKS)
    for h in hooks:
        h.remove()
    total = 0.0
    paths = spec.linear_paths
    for index, (layer, new) in enumerate(zip(decoder_layers(original.model), decoder_layers(result.model))):
        for role, module in linear_modules(layer, spec).items():
            w = module.weight.detach().double()
            other = get_submodule(new, paths[role])
            approx = (other.dense_weight() if isinstance(other, LowRankLinear) else other.weight).detach()
            diff, g = w - approx.double(), grams[f"{index}.{role}"]
            total += float(((diff @ g) * diff).sum() / ((w @ g) * w).sum())
    return total


@pytest.mark.parametrize("target", [0.2, 0.4])
def test_sharing_alike_layers_loses_less_than_per_layer_svd_llm_at_equal_parameters(alike, target):
    shared = _run("share.basis", alike, target_params=target)
    single = _run("lowrank.svd", alike, method="svd-llm", target_params=target)
    assert _linear_params(shared.loaded) <= _linear_params(single.loaded)  # no more parameters than SVD-LLM
    assert shared.details["shared_bases"] > 0
    assert _whitened_loss(alike, shared.loaded) < 0.7 * _whitened_loss(alike, single.loaded)


def test_group_size_and_side_are_chosen_per_type_and_reported(alike):
    report = _run("share.basis", alike, target_params=0.3)
    types = report.details["types"]
    assert set(types) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    assert all(t["group_size"] in (1, 2, 4) and t["side"] in ("in", "out", "layer") for t in types.values())
    assert any(t["group_size"] > 1 for t in types.values())  # alike layers: sharing wins somewhere
    assert "shared bases" in report.summary and "\n" not in report.summary
    modules = {n: m for n, m in report.loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    shared = get_state(report.loaded).shared
    in_group = {u.rpartition(".")[0] for e in shared.values() for u in e.users}
    for name, module in modules.items():  # every rank a multiple of 8, below its group's break-even
        if name in in_group:
            continue
        entry = shared.get(f"{name}.0") or shared.get(f"{name}.1")
        n, rank, out_features, in_features = 1 + len(entry.users if entry else ()), module.rank, \
            module.out_features, module.in_features  # fmt: skip
        side = "in" if f"{name}.0" in shared else "out"
        cost = rank * (in_features + n * out_features) if side == "in" else rank * (out_features + n * in_features)
        assert rank % 8 == 0 and cost < n * out_features * in_features


def test_kd_trains_each_shared_basis_once(alike, tmp_path):
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    rng = random.Random(0)
    text = tmp_path / "train.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)) + "\n")
    student = _run("share.basis", alike, target_params=0.3, group_sizes=[2], side="in").loaded
    path = _factorized_path(student)
    basis = [get_submodule(layer, path)[0] for layer in decoder_layers(student.model)[:2]]
    before = basis[0].weight.detach().clone()
    spec = get_pass("distill.kd")
    ctx = PassContext(loaded=student, original=lambda: alike, calibration=lambda: None, seed=0,
                      checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    values = {"data": str(text), "steps": 2, "seq_len": 32, "batch_size": 2, "checkpoint_every": 1, "lr": 1e-3}
    spec.apply(ctx, build_config(spec, values))
    optimizer = torch.load(next((tmp_path / "ckpt").iterdir()) / "optimizer.pt", weights_only=True)["optimizer"]
    assert len(optimizer["state"]) == len(list(student.model.parameters()))  # each shared tensor once
    assert basis[1].weight is basis[0].weight
    assert not torch.equal(basis[0].weight, before)  # the shared basis was trained


def test_export_refuses_without_merge_and_merge_writes_the_dense_product(alike, tmp_path):
    loaded = _run("share.basis", alike, target_params=0.3, group_sizes=[2]).loaded
    with pytest.raises(ConfigError, match="--merge") as error:
        kompakt.export(loaded, format="gguf", out=tmp_path / "out.gguf")
    assert "\n" not in str(error.value) and not list(tmp_path.glob("out*"))
    result = kompakt.export(loaded, format="hf", out=tmp_path / "merged", merge=True)
    assert result.check is not None and not result.check.failed and any("full size" in n for n in result.notes)
    merged = kompakt.load(tmp_path / "merged", device="cpu")
    assert merged.num_parameters() == alike.num_parameters() and not get_state(merged).shared
    torch.testing.assert_close(_logits(merged), _logits(loaded), rtol=0, atol=1e-4)


def _different_widths() -> LoadedModel:
    loaded = tiny_model("llama")
    mlp = decoder_layers(loaded.model)[1].mlp
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False), \
        nn.Linear(96, 64, bias=False)  # fmt: skip
    return loaded


@pytest.mark.parametrize("values, message", [
    ({"target_params": 0.0}, "in \\(0, 1\\)"), ({"target_params": 1.0}, "in \\(0, 1\\)"),
    ({"group_sizes": [8]}, "group of 8 layers does not fit the model's 4"),
    ({"group_sizes": [0]}, "group_sizes must be a list"), ({"group_sizes": []}, "group_sizes must be a list"),
    ({"group_sizes": "2 4"}, r"group_sizes got '2 4'.*write a list as \[2, 4\]"), ({"group_sizes": ["x"]}, "group_sizes must be a list"),
    ({"side": "both"}, "auto, in, out"), ({"choose": "best"}, "type, global"), ({"target_params": 0.97}, "cannot be met without exceeding dense"),
])  # fmt: skip
def test_bad_input_is_one_line_and_changes_nothing(values, message):
    original = tiny_model("llama")
    loaded = copy.deepcopy(original)
    spec = get_pass("share.basis")
    with pytest.raises(ConfigError, match=message) as error:
        spec.apply(PassContext(loaded=loaded, original=lambda: original, calibration=lambda: BLOCKS),
                   build_config(spec, {"target_params": 0.2, **values}))  # fmt: skip
    assert "\n" not in str(error.value)
    assert not get_state(loaded).lowrank and torch.equal(_logits(loaded), _logits(original))


@pytest.mark.parametrize("make, message", [
    (_different_widths, "differ in shape across layers"),
    (lambda: _run("share.basis", tiny_model("llama"), target_params=0.2).loaded, "already factorized"),
    (lambda: _run("lowrank.svd", tiny_model("llama"), target_params=0.2).loaded, "already factorized"),
])  # fmt: skip
def test_models_that_cannot_share_a_basis_are_refused(make, message):
    loaded = make()
    with pytest.raises(ConfigError, match=message) as error:
        _run("share.basis", loaded, target_params=0.2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["quant.rtn", "quant.gptq"])
def test_quantizing_the_factors_rounds_each_shared_basis_once_and_reloads(alike, name, tmp_path):
    from kompakt.model.quantized import is_quantized

    shared = _run("share.basis", alike, target_params=0.3, group_sizes=[2], side="in").loaded
    path = _factorized_path(shared)
    spec = get_pass(name)
    ctx = PassContext(loaded=shared, original=lambda: alike, calibration=lambda: BLOCKS, seed=0)
    report = spec.apply(ctx, build_config(spec, {"bits": 4, "group_size": 32}))
    loaded = report.loaded
    m0, m1 = (get_submodule(layer, path) for layer in decoder_layers(loaded.model)[:2])
    assert m1[0].weight is m0[0].weight and is_quantized(loaded)
    basis = m0[0].weight.detach()  # [k, 64]: two groups of 32 columns per row, 16 levels each
    assert max(len(group.unique()) for row in basis.reshape(basis.shape[0], 2, 32) for group in row) <= 16
    assert {f"model.layers.{d}.{path}.{i}" for d in (0, 1) for i in (0, 1)} <= set(get_state(loaded).quantization.modules)
    save_model(loaded, tmp_path / "q")
    reloaded = kompakt.load(tmp_path / "q", device="cpu")
    assert is_quantized(reloaded) and get_submodule(decoder_layers(reloaded.model)[1], path)[0].weight is \
        get_submodule(decoder_layers(reloaded.model)[0], path)[0].weight  # fmt: skip
    torch.testing.assert_close(_logits(reloaded), _logits(loaded), rtol=0, atol=1e-5)


def test_groups_of_one_layer_are_lowrank_svd_svd_llm(alike):
    ours = _run("share.basis", alike, target_params=0.3, group_sizes=[1])
    reference = _run("lowrank.svd", alike, method="svd-llm", target_params=0.3)
    assert ours.details["shared_bases"] == 0 and ours.details["linear_params"] == reference.details["linear_params"]
    torch.testing.assert_close(_logits(ours.loaded), _logits(reference.loaded), rtol=0, atol=1e-4)


def test_global_choice_never_loses_to_per_layer_allocation_on_the_calibration_loss():
    model = tiny_model("llama", seed=3)  # unrelated layers: sharing rarely pays, and must not be forced
    single = _run("share.basis", model, target_params=0.3, group_sizes=[1], choose="global").details
    chosen = _run("share.basis", model, target_params=0.3, choose="global").details
    assert chosen["allocation_loss"] <= single["allocation_loss"] and single["allocation_loss"] > 0
    assert chosen["linear_params"][1] <= int(0.7 * chosen["linear_params"][0])


def test_the_update_refits_only_each_layers_own_factor(alike):
    fixed = _run("share.basis", alike, target_params=0.4, group_sizes=[2], side="in", update=False).loaded
    updated = _run("share.basis", alike, target_params=0.4, group_sizes=[2], side="in").loaded
    assert get_state(updated).lowrank == get_state(fixed).lowrank and get_state(updated).shared == get_state(fixed).shared
    path = _factorized_path(updated)
    new, old = get_submodule(decoder_layers(updated.model)[1], path), get_submodule(decoder_layers(fixed.model)[1], path)
    torch.testing.assert_close(new[0].weight, old[0].weight)  # the basis comes from the unchanged model in both
    assert not torch.allclose(new[1].weight, old[1].weight)  # the coefficients saw the compressed layers' outputs


def test_cli_group_that_does_not_fit_exits_2_and_writes_no_step(cli, tmp_path):
    from kompakt.model.tiny import save_tiny

    save_tiny("llama", tmp_path / "model")
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)) + "\n")
    code, _, err = cli(["compress", str(tmp_path / "model"), "--step", "share.basis:group_sizes=[2, 8]", "--data",
                        str(text), "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "does not fit the model's 4 decoder layers" in err and len(err.strip().splitlines()) == 1, err
    assert not any((tmp_path / "run" / "steps").iterdir())  # no step directory, complete or half-written
