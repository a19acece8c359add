"""Per-expert routing statistics (kompakt.scoring.experts) on tiny MoE models: counts add up,
REAP follows the expert's output scale, a dominated router shows in the entropies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.model import moe
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.inputs import pad_sentences
from kompakt.model.tiny import TINY_MOE, tiny_model
from kompakt.scoring.experts import ExpertStats, expert_stats

BATCHES = [torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]


@pytest.mark.parametrize("family", TINY_MOE)
def test_counts_add_up_and_round_trip(family):
    loaded = tiny_model(family)
    stats = expert_stats(loaded.model, BATCHES)
    assert stats.tokens == [128, 128]
    for frequency, share in zip(stats.frequency, stats.share):
        assert frequency.sum() == 128 * moe.top_k(loaded)
        assert share.sum() == pytest.approx(moe.top_k(loaded))
    assert all(0 < e <= np.log(4) + 1e-6 for e in stats.token_entropy)
    assert all(0 < e <= 1 + 1e-9 for e in stats.load_entropy)
    assert all((r > 0).all() for r in stats.reap)
    again = ExpertStats.from_dict(stats.to_dict())
    assert np.allclose(again.reap[1], stats.reap[1]) and again.load_entropy == stats.load_entropy


def test_reap_is_gate_times_output_norm():
    """Doubling expert 1's down projection doubles its output norm and REAP (routing unchanged:
    the router reads the block input, not the experts); zeroing it makes both 0."""
    loaded = tiny_model("qwen3_moe")
    layer = decoder_layers(loaded)[1]
    spec = arch_for(loaded).moe
    before = expert_stats(loaded.model, BATCHES)
    with torch.no_grad():
        moe.expert_linears(layer, spec, 1)["expert.down"].mul_(2.0)
    after = expert_stats(loaded.model, BATCHES)
    assert np.array_equal(after.frequency[1], before.frequency[1])
    np.testing.assert_allclose(after.reap[1][1], 2 * before.reap[1][1], rtol=1e-5)
    np.testing.assert_allclose(after.reap[1][[0, 2, 3]], before.reap[1][[0, 2, 3]], rtol=1e-5)
    with torch.no_grad():
        moe.expert_linears(layer, spec, 1)["expert.down"].zero_()
    zeroed = expert_stats(loaded.model, BATCHES)
    assert zeroed.reap[1][1] == 0 and zeroed.output_norm[1][1] == 0 and zeroed.frequency[1][1] > 0


def test_reap_by_hand_matches():
    """REAP of layer 0 recomputed from the router input: mean over routed tokens of softmax
    probability x ||expert output||."""
    loaded = tiny_model("mixtral")
    layer = decoder_layers(loaded)[0]
    spec = arch_for(loaded).moe
    seen = []
    handle = moe.router_module(layer, spec).register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    stats = expert_stats(loaded.model, BATCHES[:1])
    handle.remove()
    x = seen[0]
    probs, chosen, _ = moe.route(layer, spec, x)
    for e in range(4):
        rows = (chosen == e).any(-1)
        norms = moe.expert_forward(layer, spec, e, x[rows]).norm(dim=-1)
        assert stats.reap[0][e] == pytest.approx(float((probs[rows, e] * norms).mean()), rel=1e-5)
        assert stats.frequency[0][e] == int(rows.sum())


def test_a_sharper_router_lowers_the_token_entropy():
    loaded = tiny_model("olmoe")
    before = expert_stats(loaded.model, BATCHES)
    with torch.no_grad():
        moe.router_weight(decoder_layers(loaded)[0], arch_for(loaded).moe).mul_(20.0)
    after = expert_stats(loaded.model, BATCHES)
    assert after.token_entropy[0] < 0.5 * before.token_entropy[0]
    assert after.token_entropy[1] == pytest.approx(before.token_entropy[1], rel=0.5)


def test_load_entropy_is_one_for_balanced_load():
    even = ExpertStats(tokens=[8], frequency=[np.array([4.0, 4, 4, 4])], reap=[np.zeros(4)], output_norm=[np.zeros(4)],
                       gate_mean=[np.zeros(4)], token_entropy=[0.0], top_k=2)  # fmt: skip
    skewed = ExpertStats.from_dict({**even.to_dict(), "frequency": [[13.0, 1, 1, 1]], "load_entropy": []})
    assert even.load_entropy == [pytest.approx(1.0)] and skewed.load_entropy[0] < 0.6


def test_padding_is_left_out():
    loaded = tiny_model("mixtral")
    batch = pad_sentences([[5, 6, 7, 8, 9], [10, 11]], pad_id=2)
    stats = expert_stats(loaded.model, [batch])
    assert stats.tokens == [7, 7] and stats.frequency[0].sum() == 7 * 2


def test_no_tokens_is_a_data_error():
    with pytest.raises(DataError, match="no calibration tokens"):
        expert_stats(tiny_model("mixtral").model, [])


def test_dense_layers_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"every layer is sparse; layers \[1\] are dense"):
        expert_stats(tiny_model("qwen2_moe", mlp_only_layers=[1]).model, BATCHES)
