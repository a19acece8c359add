"""Skip cost: streamed over calibration batches or on a stored reference, the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from kompakt.model.arch import arch_for, decoder_layers, get_submodule
from kompakt.model.tiny import tiny_model
from kompakt.scoring.reference import build_reference, score
from kompakt.scoring.skip import skip_costs, skip_kl

WINDOWS = torch.randint(0, 261, (4, 24), generator=torch.Generator().manual_seed(0))


def test_streamed_skip_kl_equals_the_stored_reference():
    loaded = tiny_model("llama", num_hidden_layers=5)
    layers, windows = decoder_layers(loaded.model), list(WINDOWS.unsqueeze(1))
    stored = [s.kl_mean for s in skip_costs(loaded.model, layers, build_reference(loaded.model, layers, windows))]
    assert skip_kl(loaded.model, layers, windows) == pytest.approx(stored, rel=1e-9, abs=1e-12)
    assert skip_kl(loaded.model, layers, [WINDOWS[:3], WINDOWS[3:]]) == pytest.approx(stored, rel=1e-4, abs=1e-9)


def test_skipping_an_identity_layer_costs_nothing():
    loaded = tiny_model("qwen2")
    spec, layers = arch_for(loaded.model), decoder_layers(loaded.model)
    with torch.no_grad():
        get_submodule(layers[2], spec.o).weight.zero_()
        get_submodule(layers[2], spec.down).weight.zero_()
    costs = skip_kl(loaded.model, layers, [WINDOWS])
    assert costs[2] < 1e-9 < min(costs[:2] + costs[3:])


def test_a_teacher_supplies_the_reference_distribution_only():
    loaded = tiny_model("llama")
    layers = decoder_layers(loaded.model)
    same = skip_kl(loaded.model, layers, [WINDOWS], teacher=copy.deepcopy(loaded.model))
    assert same == pytest.approx(skip_kl(loaded.model, layers, [WINDOWS]), rel=1e-5, abs=1e-9)
    other = tiny_model("llama", seed=5).model
    reference = build_reference(loaded.model, layers, [WINDOWS], teacher=other)
    assert len(reference.layer_inputs[0]) == 1  # captured from the model, once per window
    assert score(loaded.model, reference).kl_mean > 0.01  # the unedited model differs from the teacher


def test_skip_kl_holds_at_most_max_bytes_of_reference_and_scores_the_same():
    """Each batch is split into chunks of rows whose reference (every layer's input and the
    reference's top-k distributions) fits the budget; rows are independent, so the KL is unchanged."""
    from kompakt.scoring.skip import rows_within

    loaded = tiny_model("llama", num_hidden_layers=5)
    model, layers = loaded.model, decoder_layers(loaded.model)
    rows = rows_within(model, len(layers), WINDOWS.shape[1], max_bytes=250_000)
    assert 1 <= rows < WINDOWS.shape[0]
    reference = build_reference(model, layers, [WINDOWS[:rows]])
    held = sum(t.numel() * t.element_size() for ts in reference.layer_inputs for t in ts)
    held += sum(t.numel() * t.element_size() for d in reference.distributions
                for t in (d.indices, d.log_probs, d.rest_mass, d.target_log_probs))  # fmt: skip
    assert held <= 250_000
    whole = skip_kl(model, layers, [WINDOWS])
    assert skip_kl(model, layers, [WINDOWS], max_bytes=250_000) == pytest.approx(whole, rel=1e-4, abs=1e-9)
    assert skip_kl(model, layers, [WINDOWS], max_bytes=1) == pytest.approx(whole, rel=1e-4, abs=1e-9)


def test_replay_puts_back_an_instance_forward_a_hook_had_set():
    """accelerate's offload hooks set `module.forward` on the instance; replay must restore it."""
    from kompakt.scoring.reference import replay

    loaded = tiny_model("llama")
    layers = decoder_layers(loaded.model)
    reference = build_reference(loaded.model, layers, [WINDOWS[:1]])
    hooked = layers[0].forward  # the bound class method, stored on the instance as a hook would
    layers[0].forward = hooked
    with replay(layers, 2, reference, 1):
        assert layers[0].forward is not hooked and "forward" in vars(layers[1])
    assert vars(layers[0])["forward"] is hooked and "forward" not in vars(layers[1])
