"""Routing-aware calibration of MoE experts (kompakt.calib.experts through the sequential
driver): each expert's statistics cover the tokens routed to it, GPTQ per expert beats RTN on
those tokens, and a starved expert is calibrated on all tokens and named in the notes."""

from __future__ import annotations

import copy

import pytest
import torch

import kompakt.calib.experts as calib_experts
from kompakt.calib.capture import capture_layer_inputs
from kompakt.calib.experts import capture_routed, collect_expert_stats
from kompakt.model import moe
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.compression import get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, registry
from kompakt.scoring.experts import expert_stats

BLOCKS = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(0))


def _quantized(original: LoadedModel, name: str, values: dict) -> tuple[LoadedModel, dict]:
    student = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name=original.name)
    spec = registry()[name]
    ctx = PassContext(loaded=student, original=lambda: original, calibration=lambda: BLOCKS, teacher=None,
                      training=None, evaluation=None, seed=0, work_dir=None)  # fmt: skip
    report = spec.apply(ctx, build_config(spec, values))
    return report.loaded, report.details


def _routed_inputs(loaded: LoadedModel):
    """The original model's layer-0 MoE-block inputs and their routing."""
    captured = capture_layer_inputs(loaded.model, BLOCKS, batch_size=8)
    return capture_routed(decoder_layers(loaded)[0], 0, captured, captured.hidden, arch_for(loaded))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gptq_per_expert_beats_rtn_on_routed_tokens(family):
    original = tiny_model(family, seed=1)
    grid = {"bits": 3, "group_size": 32, "modules": "mlp"}  # experts (+ shared expert); attention untouched
    gptq, details = _quantized(original, "quant.gptq", grid)
    rtn, _ = _quantized(original, "quant.rtn", grid)
    spec = arch_for(original).moe
    routed = _routed_inputs(original)  # layer 0's MoE input is the original's (attention unchanged)
    x = torch.cat(routed.hidden)
    chosen = torch.cat(routed.chosen)
    for expert in range(moe.num_experts(original)):
        rows = x[(chosen == expert).any(-1)]
        assert rows.shape[0] >= calib_experts.MIN_EXPERT_TOKENS  # routed calibration, no fallback here
        want = moe.expert_forward(decoder_layers(original)[0], spec, expert, rows)
        errors = {name: float((moe.expert_forward(decoder_layers(m)[0], spec, expert, rows) - want).square().sum())
                  for name, m in (("gptq", gptq), ("rtn", rtn))}  # fmt: skip
        assert 0 < errors["gptq"] <= errors["rtn"], (expert, errors)
    assert not [note for note in details["notes"] if "calibrated on all tokens" in note]


def test_expert_statistics_cover_their_routed_tokens_only():
    loaded = tiny_model("olmoe")
    spec = arch_for(loaded)
    layer = decoder_layers(loaded)[0]
    captured = capture_layer_inputs(loaded.model, BLOCKS, batch_size=8)
    views = moe.expert_linear_modules(layer, spec.moe)
    stats, notes = collect_expert_stats(layer, 0, captured, captured.hidden, spec, views)
    counts = expert_stats(loaded.model, [BLOCKS]).frequency[0]
    for expert in range(4):
        gate, up, down = (stats[moe.expert_role(expert, p)] for p in moe.EXPERT_PARTS)
        assert gate.n_samples == up.n_samples == down.n_samples == counts[expert]
        assert up.hessian_acc is gate.hessian_acc  # up reads gate's input: one accumulation
        assert down.module.in_features == moe.expert_width(loaded)
    assert not notes and sum(counts) == BLOCKS.numel() * moe.top_k(loaded)


def test_starved_expert_is_calibrated_on_all_tokens_and_named(monkeypatch):
    original = tiny_model("qwen3_moe", seed=2)
    counts = expert_stats(original.model, [BLOCKS]).frequency[0].astype(int)
    threshold = int(counts.min()) + 1  # the least-routed expert(s) of layer 0 fall below it
    starved = [e for e in range(4) if counts[e] < threshold]
    monkeypatch.setattr(calib_experts, "MIN_EXPERT_TOKENS", threshold)
    _, details = _quantized(original, "quant.gptq", {"bits": 4, "group_size": 32, "modules": "mlp"})
    layer0 = [note for note in details["notes"] if note.startswith("layer 0:")]
    listed = ", ".join(f"{e} ({counts[e]} tokens)" for e in starved)
    assert layer0 == [f"layer 0: experts {listed} were routed fewer than {threshold} of {BLOCKS.numel()} "
                      "calibration tokens: calibrated on all tokens of the layer"]  # fmt: skip

    layer = decoder_layers(original)[0]
    captured = capture_layer_inputs(original.model, BLOCKS, batch_size=8)
    views = moe.expert_linear_modules(layer, arch_for(original).moe)
    stats, _ = collect_expert_stats(layer, 0, captured, captured.hidden, arch_for(original), views,
                                    min_tokens=threshold)  # fmt: skip
    for expert in range(4):
        expected = BLOCKS.numel() if expert in starved else counts[expert]
        assert stats[moe.expert_role(expert, "down")].n_samples == expected


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparse_pruning_reaches_every_expert(method):
    original = tiny_model("mixtral")
    pruned, details = _quantized(original, "prune.sparse", {"method": method, "sparsity": 0.5})
    layer = decoder_layers(pruned)[1]
    for expert in range(4):
        for part, weight in moe.expert_linears(layer, arch_for(pruned).moe, expert).items():
            assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02), part
    assert any(".mlp.experts.3.down" in name for name in details["linears"])


def test_awq_scales_every_expert_and_helps_rtn_on_routed_tokens():
    original = tiny_model("mixtral", seed=1)
    grid = {"bits": 3, "group_size": 32, "modules": "mlp"}
    scaled, details = _quantized(original, "quant.awq", {"bits": 3, "group_size": 32})
    assert details["scales"]["points"] == 2 * (2 + 4)  # per layer: q/k/v and v->o, then up->down of 4 experts
    awq_rtn, _ = _quantized(scaled, "quant.rtn", grid)
    rtn, _ = _quantized(original, "quant.rtn", grid)
    spec = arch_for(original).moe
    routed = _routed_inputs(original)
    x, chosen = torch.cat(routed.hidden), torch.cat(routed.chosen)
    errors = {"awq": 0.0, "rtn": 0.0}
    for expert in range(4):
        rows = x[(chosen == expert).any(-1)]
        want = moe.expert_forward(decoder_layers(original)[0], spec, expert, rows)
        for name, model in (("awq", awq_rtn), ("rtn", rtn)):
            errors[name] += float((moe.expert_forward(decoder_layers(model)[0], spec, expert, rows) - want).square().sum())
    assert errors["awq"] < errors["rtn"], errors


def test_quantized_experts_are_recorded_and_on_the_grid():
    """Every expert Linear is in the compression state under its expert name (named_weight
    resolves it to the fused parameters) and holds at most 16 values per group of 32 (int4)."""
    quantized, _ = _quantized(tiny_model("olmoe"), "quant.gptq", {"bits": 4, "group_size": 32})
    names = [n for n in get_state(quantized).quantization.modules if ".mlp.experts." in n]
    assert len(names) == 2 * 4 * 3 and "model.layers.1.mlp.experts.3.down" in names
    for name in names:
        weight = moe.named_weight(quantized, name)
        assert max(len(group.unique()) for group in weight.float().reshape(-1, 32)) <= 16, name
