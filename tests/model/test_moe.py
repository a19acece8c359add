"""The MoE layout (kompakt.model.moe) on every tiny MoE family: expert views match what the
block computes, router decisions are the block's, expert / top-k edits keep config.json
consistent so save -> kompakt.load reloads the same logits."""

from __future__ import annotations

import pytest
import torch

import kompakt
from kompakt.errors import ConfigError
from kompakt.model import moe
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.tiny import TINY_MOE, save_tiny, tiny_model

IDS = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize("family", TINY_MOE)
def test_expert_views_recompute_the_block(family):
    loaded = tiny_model(family)
    spec = arch_for(loaded).moe
    layer = decoder_layers(loaded)[1]
    x = torch.randn(12, loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    probs, chosen, gates = moe.route(layer, spec, x)
    assert probs.shape == (12, moe.num_experts(loaded)) and chosen.shape == (12, moe.top_k(loaded))
    if moe.renormalizes(loaded):
        torch.testing.assert_close(gates.sum(-1), torch.ones(12))
    else:
        torch.testing.assert_close(gates, probs.gather(1, chosen).to(gates.dtype))
    by_hand = torch.zeros_like(x)
    for t in range(12):
        for j in range(chosen.shape[1]):
            by_hand[t] += gates[t, j] * moe.expert_forward(layer, spec, int(chosen[t, j]), x[t : t + 1])[0]
    torch.testing.assert_close(by_hand, moe.experts_module(layer, spec)(x, chosen, gates))


@pytest.mark.parametrize("family", TINY_MOE)
def test_keep_experts_and_top_k_round_trip(family, tmp_path):
    loaded = tiny_model(family)
    layer = decoder_layers(loaded)[0]
    spec = arch_for(loaded).moe
    expert2 = {role: w.clone() for role, w in moe.expert_linears(layer, spec, 2).items()}
    router2 = moe.router_weight(layer, spec)[2].clone()
    changes = moe.keep_experts(loaded, [[2, 0, 3], [0, 1, 2]])
    assert changes["num_experts"] == [4, 3] and moe.num_experts(loaded) == 3
    for role, weight in moe.expert_linears(layer, spec, 0).items():  # expert 2 is now first
        assert torch.equal(weight, expert2[role])
    assert torch.equal(moe.router_weight(layer, spec)[0], router2)
    moe.set_top_k(loaded, 1)
    assert moe.route(layer, spec, torch.randn(3, loaded.model.config.hidden_size))[1].shape == (3, 1)
    logits = _logits(loaded)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    reloaded = kompakt.load(tmp_path)
    assert moe.num_experts(reloaded) == 3 and moe.top_k(reloaded) == 1
    torch.testing.assert_close(_logits(reloaded), logits, rtol=0, atol=1e-5)


def test_expert_views_write_through():
    loaded = tiny_model("mixtral")
    layer = decoder_layers(loaded)[0]
    spec = arch_for(loaded).moe
    moe.expert_linears(layer, spec, 1)["expert.down"].zero_()
    assert moe.get_experts(layer, spec).down[1].abs().sum() == 0


def test_bad_expert_edits_refuse_before_changing_anything():
    loaded = tiny_model("olmoe")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(ConfigError, match="top-k 2"):
        moe.keep_experts(loaded, [[0], [1]])
    with pytest.raises(ConfigError, match="same number of experts"):
        moe.keep_experts(loaded, [[0, 1], [0, 1, 2]])
    with pytest.raises(ConfigError, match="distinct"):
        moe.keep_experts(loaded, [[0, 0], [0, 1]])
    with pytest.raises(ConfigError, match="top-k must be"):
        moe.set_top_k(loaded, 5)
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts"):
        moe.moe_spec(tiny_model("llama"))
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())
    assert moe.num_experts(loaded) == 4


def test_dense_layers_are_named():
    loaded = tiny_model("qwen3_moe", mlp_only_layers=[0])
    with pytest.raises(ConfigError, match=r"layers \[0\] are dense"):
        moe.require_all_sparse(loaded)


@pytest.mark.parametrize("family", TINY_MOE)
def test_saved_tiny_moe_reloads_with_the_same_logits(family, tmp_path):
    loaded = save_tiny(family, tmp_path)
    reloaded = kompakt.load(tmp_path)
    assert type(reloaded.model) is type(loaded.model)
    torch.testing.assert_close(_logits(reloaded), _logits(loaded), rtol=0, atol=1e-5)
