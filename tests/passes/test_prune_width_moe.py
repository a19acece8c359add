"""prune.width on tiny MoE models: every expert keeps its own most important channels (ranked on
its routed tokens), the shared expert the same fraction, heads as on dense models; what does
not apply to MoE is refused before anything changes."""

from __future__ import annotations

import pytest
import torch

import kompakt
from kompakt.errors import ConfigError
from kompakt.model import moe
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.tiny import TINY_MOE, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.scoring.channels import top_k
from kompakt.scoring.experts import expert_channel_importance

CALIB = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def _prune(loaded, **values):
    spec = get_pass("prune.width")
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIB, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize("family", TINY_MOE)
def test_each_expert_keeps_its_own_top_channels(family, tmp_path):
    loaded = tiny_model(family)
    spec = arch_for(loaded).moe
    layer = decoder_layers(loaded)[1]
    with torch.no_grad():  # channel 5 of expert 0 never fires: act(gate) * up = 0 there
        moe.expert_linears(layer, spec, 0)["expert.up"][5].zero_()
    batches = list(CALIB.split(4))
    scores = expert_channel_importance(loaded.model, batches)
    assert scores.experts[1][0][5] == 0
    before = {e: {k: v.clone() for k, v in moe.expert_linears(layer, spec, e).items()} for e in range(4)}
    report = _prune(loaded, mlp_fraction=0.5)
    assert moe.expert_width(loaded) == 16
    kept = [top_k(scores.experts[1][e], 16) for e in range(4)]
    assert 5 not in kept[0].tolist()
    assert len({tuple(k.tolist()) for k in kept}) > 1  # ranked per expert, not one list for all
    for e in range(4):
        now = moe.expert_linears(layer, spec, e)
        assert torch.equal(now["expert.gate"], before[e]["expert.gate"][kept[e]])
        assert torch.equal(now["expert.down"], before[e]["expert.down"][:, kept[e]])
    if spec.shared_expert:
        assert loaded.model.config.shared_expert_intermediate_size == 24
    assert report.details["parameters"][1] < report.details["parameters"][0]
    logits = _logits(loaded)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(kompakt.load(tmp_path)), logits, rtol=0, atol=1e-5)


def test_heads_and_experts_together():
    loaded = tiny_model("qwen3_moe")
    report = _prune(loaded, mlp_fraction=0.25, heads_fraction=0.5)
    assert loaded.model.config.num_key_value_heads == 1 and moe.expert_width(loaded) == 24
    assert "num_key_value_heads 2→1" in report.summary and torch.isfinite(_logits(loaded)).all()


@pytest.mark.parametrize("values, match", [
    ({"hidden_fraction": 0.25}, "expert channels and heads only"),
    ({"target_params": 0.05}, "needs fewer than 4 of 32 expert channels"),
])  # fmt: skip
def test_what_moe_cannot_take_is_refused_first(values, match):
    loaded = tiny_model("mixtral")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        _prune(loaded, **values)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_target_params_cuts_expert_channels(family):
    loaded = tiny_model(family)
    before = loaded.num_parameters()
    _prune(loaded, target_params=0.7, round_to=8)
    assert loaded.num_parameters() / before == pytest.approx(0.7, abs=0.06)
    assert moe.expert_width(loaded) % 8 == 0 and moe.expert_width(loaded) < 32


def test_expert_widths_stay_multiples_of_8_for_grouped_mm():
    """transformers' grouped_mm needs 16-byte strides: 17 kept channels would fail in the forward."""
    loaded = tiny_model("qwen3_moe")
    _prune(loaded, mlp_channels=17)
    assert moe.expert_width(loaded) == 16
    loaded.model.to(torch.bfloat16)
    assert torch.isfinite(_logits(loaded).float()).all()


def test_olmoe_heads_are_refused():
    with pytest.raises(ConfigError, match="heads cannot be removed from olmoe"):
        _prune(tiny_model("olmoe"), heads_fraction=0.5)
