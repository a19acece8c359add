"""moe.prune, moe.topk and moe.merge on the tiny MoE families: REAP finds the expert whose output
is tiny, frequency pruning the least routed one, top-1 routes to the router's first choice with
the family's renormalisation, merging aligns neurons; bad plans are one-line errors that leave
the model untouched (every pass x family save -> reload: tests/passes/test_pass_contract.py)."""

from __future__ import annotations

import pytest
import torch

import kompakt
from kompakt.errors import ConfigError
from kompakt.model import moe
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.tiny import TINY_MOE, tiny_model
from kompakt.ops.moe_experts import group_by_router, merge_group, permute_neurons
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.scoring.experts import expert_stats

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = BLOCKS[:2, :16]


def _run(name: str, loaded, **values):
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: BLOCKS, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _moe(family: str, seed: int = 0):
    """A tiny MoE whose experts and router differ clearly (transformers' init leaves them near zero)."""
    loaded = tiny_model(family, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if ".experts." in name or name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return loaded


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize("family", TINY_MOE)
def test_reap_removes_the_quiet_expert_and_frequency_the_least_routed(family):
    loaded = _moe(family)
    frequency = expert_stats(loaded.model, BLOCKS.split(4)).frequency
    busiest = [int(f.argmax()) for f in frequency]
    least = [max(e for e in range(4) if f[e] == f.min()) for f in frequency]  # ties: the higher index goes
    spec = arch_for(loaded).moe
    with torch.no_grad():  # the busiest expert of each layer now barely changes its tokens
        for layer, expert in zip(decoder_layers(loaded), busiest):
            moe.get_experts(layer, spec).down[expert] *= 1e-3
    frequency_plan = _run("moe.prune", _moe(family), count=1, method="frequency").details["removed_experts"]
    assert frequency_plan == [[e] for e in least]
    report = _run("moe.prune", loaded, count=1, method="reap")
    assert report.details["removed_experts"] == [[e] for e in busiest]
    assert moe.num_experts(loaded) == 3 and all(
        moe.router_weight(layer, spec).shape[0] == 3 for layer in decoder_layers(loaded)
    )


def test_pruned_model_saves_and_reloads_with_the_same_logits(tmp_path):
    loaded = _moe("mixtral")
    router_before = moe.router_weight(decoder_layers(loaded)[0], arch_for(loaded).moe).detach().clone()
    report = _run("moe.prune", loaded, fraction=0.5, method="reap")
    kept = [e for e in range(4) if e not in report.details["removed_experts"][0]]
    torch.testing.assert_close(moe.router_weight(decoder_layers(loaded)[0], arch_for(loaded).moe), router_before[kept])
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    back = kompakt.load(tmp_path / "m", device="cpu", dtype="float32")
    assert back.model.config.num_local_experts == 2 and moe.top_k(back) == 2
    torch.testing.assert_close(_logits(back), _logits(loaded))


@pytest.mark.parametrize("name", ["moe.prune", "moe.merge"])
def test_leaving_fewer_experts_than_top_k_is_refused_before_any_change(name):
    loaded = _moe("qwen3_moe")
    before = _logits(loaded)
    with pytest.raises(ConfigError, match=r"fewer than top-k 2; remove at most 2") as error:
        _run(name, loaded, count=3)
    assert "\n" not in str(error.value)
    assert moe.num_experts(loaded) == 4 and torch.equal(_logits(loaded), before)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_top1_routes_to_the_first_choice_with_the_family_weighting(family):
    loaded = _moe(family)
    layer = decoder_layers(loaded)[1]
    spec = arch_for(loaded).moe
    x = torch.randn(10, loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    probs, chosen, _ = moe.route(layer, spec, x)
    report = _run("moe.topk", loaded, top_k=1)
    assert loaded.model.config.num_experts_per_tok == 1 and report.details["top_k"] == [2, 1]
    first = chosen[:, 0]
    gate = torch.ones(10) if moe.renormalizes(loaded) else probs.gather(1, first[:, None])[:, 0]
    expected = torch.stack([gate[t] * moe.expert_forward(layer, spec, int(first[t]), x[t : t + 1])[0] for t in range(10)])
    got = moe.experts_module(layer, spec)(x, *moe.route(layer, spec, x)[1:])
    torch.testing.assert_close(got, expected)


def test_top1_renormalisation_switch():
    loaded = _moe("qwen3_moe")  # the tiny Qwen3-MoE does not renormalise
    _run("moe.topk", loaded, top_k=1, renormalize=True)
    assert loaded.model.config.norm_topk_prob is True and moe.renormalizes(loaded)
    layer = decoder_layers(loaded)[0]
    _, _, gates = moe.route(layer, arch_for(loaded).moe, torch.randn(5, loaded.model.config.hidden_size))
    torch.testing.assert_close(gates, torch.ones(5, 1))
    with pytest.raises(ConfigError, match="mixtral always renormalises"):
        _run("moe.topk", _moe("mixtral"), top_k=1, renormalize=False)
    with pytest.raises(ConfigError, match="already routes to 2"):
        _run("moe.topk", _moe("mixtral"), top_k=2)


def test_alignment_recovers_a_permuted_expert():
    """Merging an expert with a neuron-permuted copy of itself gives the expert back: the Hungarian
    matching undoes the permutation, whatever the merge weights."""
    generator = torch.Generator().manual_seed(3)
    gate_up, down = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 8, 8, generator=generator)
    perm = torch.randperm(8, generator=generator)
    gate_up[1], down[1] = permute_neurons(gate_up[0], down[0], perm)
    merged_gu, merged_down = merge_group(gate_up, down, [0, 1], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(merged_gu, gate_up[0])
    torch.testing.assert_close(merged_down, down[0])
    unaligned = 0.25 * gate_up[0] + 0.75 * gate_up[1]  # what averaging without alignment would give
    assert (unaligned - gate_up[0]).abs().max() > 0.1
    # a copy at twice the scale: the weights (normalised to 1/4, 3/4) decide, 1.75x the lead
    # (swapped: 1.25x, equal: 1.5x)
    gate_up[1], down[1] = permute_neurons(2 * gate_up[0], 2 * down[0], perm)
    merged_gu, merged_down = merge_group(gate_up, down, [0, 1], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(merged_gu, 1.75 * gate_up[0])
    torch.testing.assert_close(merged_down, 1.75 * down[0])


def test_grouping_puts_near_copies_with_their_original():
    router = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    router[3] = router[0] + 0.01  # expert 3 is routed like 0, expert 5 like 1 and 4 like 2
    router[5] = router[1] * 1.1
    router[4] = router[2] - 0.01
    groups = group_by_router(router, torch.tensor([9.0, 8, 7, 1, 1, 1]), 3)
    assert groups == [[0, 3], [1, 5], [2, 4]]


def test_merge_remaps_the_router_and_reloads(tmp_path):
    loaded = _moe("qwen2_moe")
    spec = arch_for(loaded).moe
    routers = [moe.router_weight(layer, spec).detach().clone() for layer in decoder_layers(loaded)]
    report = _run("moe.merge", loaded, fraction=0.5)
    groups = report.details["groups"]
    assert moe.num_experts(loaded) == 2 and all(len(g) == 2 and sorted(sum(g, [])) == [0, 1, 2, 3] for g in groups)
    for layer, router, layer_groups in zip(decoder_layers(loaded), routers, groups):
        torch.testing.assert_close(moe.router_weight(layer, spec), router[[g[0] for g in layer_groups]])
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(kompakt.load(tmp_path / "m", device="cpu", dtype="float32")), _logits(loaded))


def test_merge_by_hand_and_with_mean_router():
    loaded = _moe("mixtral")
    spec = arch_for(loaded).moe
    router = moe.router_weight(decoder_layers(loaded)[0], spec).detach().clone()
    report = _run("moe.merge", loaded, groups=[[0, 1], [2], [3]], router="mean")
    frequency = expert_stats(_moe("mixtral").model, BLOCKS.split(4)).frequency[0]
    lead, other = report.details["groups"][0][0]
    assert sorted([lead, other]) == [0, 1] and frequency[lead] >= frequency[other]
    w = torch.tensor([frequency[lead], frequency[other]], dtype=torch.float64)
    w = w / w.sum()
    mean_row = (router[lead].double() * w[0] + router[other].double() * w[1]).float()
    torch.testing.assert_close(moe.router_weight(decoder_layers(loaded)[0], spec)[0], mean_row)
    assert moe.num_experts(loaded) == 3


@pytest.mark.parametrize(
    ("groups", "needle"),
    [
        ([[0, 1], [2]], r"expert\(s\) \[3\] are in no group, so their router rows would point nowhere"),
        ([[0, 1], [1, 2], [3]], r"\[1\] are in more than one group"),
        ([[0, 1], [2, 7], [3]], r"\[7\] do not exist"),
        ([[0, 1, 2, 3]], "fewer experts than top-k 2"),
    ],
)
def test_bad_merge_plans_are_one_line_errors(groups, needle):
    loaded = _moe("olmoe")
    before = _logits(loaded)
    with pytest.raises(ConfigError, match=needle) as error:
        _run("moe.merge", loaded, groups=groups)
    assert "\n" not in str(error.value)
    assert torch.equal(_logits(loaded), before)
