"""Upcycling a dense llama into a Mixtral MoE: copies reproduce the dense model exactly, split
experts keep its parameter count and differ, the calibrated router and scale bring the MoE closer
to the dense model than a random router, and the result saves, reloads and exports like any MoE."""

from __future__ import annotations

import pytest
import torch

import kompakt
from kompakt.errors import ConfigError
from kompakt.model import moe
from kompakt.model.tiny import tiny_model
from kompakt.model.upcycle import balancing_offsets, block_inputs, expert_similarity, upcycle

BLOCKS = torch.randint(3, 250, (16, 64), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(1))
pytestmark = pytest.mark.usefixtures("one_thread")


def _log_probs(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits.log_softmax(-1)


def _kl(dense, candidate) -> float:
    p, q = _log_probs(dense), _log_probs(candidate)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_copies_without_noise_compute_the_dense_model(tmp_path):
    dense = tiny_model("llama")
    upcycled = upcycle(dense, experts=4, top_k=2, mode="copy", noise=0.0)
    assert upcycled.model.config.model_type == "mixtral" and moe.num_experts(upcycled) == 4
    torch.testing.assert_close(_log_probs(upcycled), _log_probs(dense), atol=1e-5, rtol=0)
    assert min(expert_similarity(upcycled, block_inputs(upcycled, BLOCKS, 256))) > 0.999
    upcycled.model.save_pretrained(tmp_path / "moe")
    upcycled.tokenizer.save_pretrained(tmp_path / "moe")
    back = kompakt.load(tmp_path / "moe", device="cpu", dtype="float32")
    torch.testing.assert_close(_log_probs(back), _log_probs(upcycled))


def test_split_keeps_the_parameters_and_a_fitted_router_beats_a_random_one():
    dense = tiny_model("llama")
    fitted = upcycle(dense, experts=4, top_k=2, mode="split", calibration=BLOCKS)
    layer_mlp = dense.model.config.intermediate_size
    assert fitted.model.config.intermediate_size == layer_mlp // 4
    router = 4 * dense.model.config.hidden_size * dense.model.config.num_hidden_layers
    assert fitted.num_parameters() == dense.num_parameters() + router
    assert max(abs(s) for s in expert_similarity(fitted, block_inputs(fitted, BLOCKS, 256))) < 0.1
    for seed in range(2):
        random_router = upcycle(dense, experts=4, top_k=2, mode="split", seed=seed)
        assert _kl(dense, fitted) < _kl(dense, random_router)


def test_router_spread_sharpens_the_gates_without_changing_the_choice():
    """A larger router_spread scales the same fitted router: the top-k experts each token is sent to
    stay the same, the gate values move away from uniform (lower routing entropy)."""
    from kompakt.scoring.experts import expert_stats

    dense = tiny_model("llama")
    gentle, sharp = (upcycle(dense, experts=4, top_k=2, calibration=BLOCKS, router_spread=s) for s in (0.1, 2.0))
    for a, b in zip(gentle.model.model.layers, sharp.model.model.layers, strict=True):
        x = torch.randn(64, a.mlp.gate.weight.shape[1], generator=torch.Generator().manual_seed(2))
        chosen = [(x @ m.mlp.gate.weight.t()).topk(2).indices.sort().values for m in (a, b)]
        assert torch.equal(*chosen)
    entropy = [sum(expert_stats(m.model, [IDS]).token_entropy) for m in (gentle, sharp)]
    assert entropy[1] < 0.8 * entropy[0]
    with pytest.raises(ConfigError, match="router_spread"):
        upcycle(dense, calibration=BLOCKS, router_spread=0.0)


def _share_spread(upcycled, inputs: list[torch.Tensor]) -> float:
    """Mean over layers of the coefficient of variation of the experts' top-2 shares on `inputs`."""
    spreads = []
    for layer, x in zip(upcycled.model.model.layers, inputs, strict=True):
        chosen = (x @ layer.mlp.gate.weight.t()).topk(2, dim=1).indices
        share = torch.bincount(chosen.flatten(), minlength=4).float()
        spreads.append(float(share.std() / share.mean()))
    return sum(spreads) / len(spreads)


def test_balancing_offsets_share_the_top_k_choices_equally():
    logits = torch.randn(4000, 8, generator=torch.Generator().manual_seed(3)) + torch.linspace(0, 2, 8)
    chosen = (logits + balancing_offsets(logits, top_k=2, step=0.5)).topk(2, dim=1).indices
    share = torch.bincount(chosen.flatten(), minlength=8).float() / chosen.numel()
    assert float((share * 8 - 1).abs().max()) < 0.02  # unbalanced: expert 7 takes ~3.5x expert 0's share


def test_a_balanced_router_loads_the_experts_evenly_on_the_calibration_tokens():
    dense = tiny_model("llama")
    inputs = block_inputs(dense, BLOCKS, 1024)
    plain, balanced = (upcycle(dense, experts=4, top_k=2, calibration=BLOCKS, router_spread=1.0, balance=b)
                       for b in (False, True))  # fmt: skip
    assert _share_spread(balanced, inputs) < 0.5 * _share_spread(plain, inputs)
    assert _kl(dense, balanced) < 2 * _kl(dense, plain)  # balancing does not wreck the fit


def test_what_cannot_be_upcycled_is_refused():
    with pytest.raises(ConfigError, match="q/k norms"):
        upcycle(tiny_model("qwen3"))
    with pytest.raises(ConfigError, match="divisible by 3 experts"):
        upcycle(tiny_model("llama"), experts=3)
    with pytest.raises(ConfigError, match="cannot be upcycled"):
        upcycle(tiny_model("mixtral"))


def test_split_neurons_partition_the_mlp_exactly():
    """Every token routed to all experts with equal weight gives back the dense MLP: the experts
    partition its neurons (no neuron lost or doubled) and the uncalibrated scale is exact there."""
    dense = tiny_model("llama")
    upcycled = upcycle(dense, experts=4, top_k=4, mode="split")
    with torch.no_grad():
        for layer in upcycled.model.model.layers:
            layer.mlp.gate.weight.zero_()  # uniform router: every weight 1 / 4
    torch.testing.assert_close(_log_probs(upcycled), _log_probs(dense), atol=1e-5, rtol=0)


def test_shared_expert_keeps_the_strongest_neurons_always_on_and_partitions_the_rest():
    """With a shared expert (Qwen2-MoE layout) the routed experts and the always-on expert together
    hold every neuron once: all experts routed with equal weight give back the dense model; top-2
    with a fitted router stays closer to the dense model than the same split without the shared part."""
    dense = tiny_model("llama")
    upcycled = upcycle(dense, experts=4, top_k=4, mode="split", shared=0.5)
    config = upcycled.model.config
    assert config.model_type == "qwen2_moe" and moe.renormalizes(upcycled) is False
    assert config.shared_expert_intermediate_size + 4 * config.moe_intermediate_size == dense.model.config.intermediate_size
    with torch.no_grad():
        for layer in upcycled.model.model.layers:
            layer.mlp.gate.weight.zero_()
    torch.testing.assert_close(_log_probs(upcycled), _log_probs(dense), atol=1e-5, rtol=0)
    with_shared = upcycle(dense, experts=4, top_k=1, mode="split", shared=0.5, calibration=BLOCKS)
    without = upcycle(dense, experts=4, top_k=1, mode="split", calibration=BLOCKS)
    assert _kl(dense, with_shared) < _kl(dense, without)
    with pytest.raises(ConfigError, match="shared"):
        upcycle(dense, shared=1.0)


def test_shared_expert_moe_reloads_and_llama_cpp_computes_it(tmp_path):
    """The Qwen2-MoE an upcycle with a shared expert gives (zero q/k/v biases, the shared expert's
    gate at 0.5) saves, reloads and runs in llama.cpp's qwen2moe graph with the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from kompakt.export import export_gguf

    upcycled = upcycle(tiny_model("llama"), experts=4, top_k=2, mode="split", shared=0.5, calibration=BLOCKS)
    upcycled.model.save_pretrained(tmp_path / "moe")
    upcycled.tokenizer.save_pretrained(tmp_path / "moe")
    back = kompakt.load(tmp_path / "moe", device="cpu", dtype="float32")
    torch.testing.assert_close(_log_probs(back), _log_probs(upcycled))
    path = export_gguf(back, tmp_path / "m.gguf", type="f32")
    ids = IDS[0].tolist()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        scores = torch.tensor(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        reference = back.model(input_ids=IDS[:1]).logits[0]
    assert (scores - reference).abs().max() < 5e-3
