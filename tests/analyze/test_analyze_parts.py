"""Pieces of the analysis on tiny random models: breakdown, channel importance, replay, sensitivity."""

from __future__ import annotations

import math

import pytest
import torch

from kompakt.analyze.breakdown import breakdown
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import tiny_model
from kompakt.scoring.channels import channel_importance
from kompakt.scoring.quant_sensitivity import quant_sensitivity, quantized_layer
from kompakt.scoring.reference import build_reference, replay, score


def _windows(n: int = 2, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 261, (1, length), generator=generator) for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
def test_breakdown_sums_to_total(family):
    loaded = tiny_model(family)
    parts = breakdown(loaded)
    assert sum(parts.params.values()) == parts.total_params == loaded.num_parameters()
    assert parts.total_bytes == parts.total_params * 4  # fp32 storage
    layer_sum = sum(row["total"] for row in parts.per_layer)
    assert layer_sum == parts.params["attention"] + parts.params["mlp"] + parts.params["other"] + sum(
        row["norms"] for row in parts.per_layer
    )
    assert parts.params["mlp"] == 4 * 3 * 64 * 128
    assert parts.tied_embeddings == (family == "gemma3_text")
    assert (parts.params["lm_head"] == 0) == parts.tied_embeddings


def test_channel_importance_finds_dead_heads_and_channels():
    loaded = tiny_model("llama")
    model, spec, layers = loaded.model, arch_for(loaded.model), decoder_layers(loaded.model)
    linears = linear_modules(layers[1], spec)
    with torch.no_grad():
        linears["attn.v"].weight[:16].zero_()  # KV head 0 -> query heads 0 and 1 output zeros
        linears["mlp.up"].weight[:10].zero_()  # channels 0..9 of the intermediate -> zero
    result = channel_importance(model, layers, _windows(3))
    assert [row.shape for row in result.heads] == [(4,)] * 4
    assert [row.shape for row in result.kv_groups] == [(2,)] * 4
    assert [row.shape for row in result.mlp] == [(128,)] * 4
    assert result.heads[1][:2].max() < 1e-6 < result.heads[1][2:].min()
    assert result.kv_groups[1][0] < 1e-6 < result.kv_groups[1][1]
    assert result.mlp[1][:10].max() < 1e-6 < result.mlp[1][10:].min()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_replayed_prefix_scores_like_a_full_forward(family):
    loaded = tiny_model(family)
    model, spec, layers = loaded.model, arch_for(loaded.model), decoder_layers(loaded.model)
    reference = build_reference(model, layers, _windows())
    assert score(model, reference).kl_mean < 1e-9  # the unmodified model against itself
    with quantized_layer(layers[2], spec, bits=3, group_size=None):
        full = score(model, reference)
        with replay(layers, 2, reference, 2) as current:
            replayed = score(model, reference, current)
    assert full.kl_mean > 1e-6
    assert replayed.kl_mean == pytest.approx(full.kl_mean, rel=1e-4)
    assert replayed.ppl == pytest.approx(full.ppl, rel=1e-5)
    assert "forward" not in vars(layers[0])  # the replay is undone


def test_sensitivity_is_finite_and_weights_restored():
    loaded = tiny_model("phi3")
    model, spec, layers = loaded.model, arch_for(loaded.model), decoder_layers(loaded.model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reference = build_reference(model, layers, _windows())
    scores, notes = quant_sensitivity(model, layers, spec, reference, bits=4, group_size=48)
    assert len(scores) == 4
    assert all(math.isfinite(s.kl_mean) and s.kl_mean >= 0 for s in scores)
    assert all(math.isfinite(s.ppl) for s in scores)
    # 48 divides neither 64 nor 128: quant.rtn's fallback (storable_group_size) uses 32 there
    assert len(notes) == 1 and "group size 48" in notes[0] and "attn.o, attn.qkv, mlp.down, mlp.gate_up: 32" in notes[0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
