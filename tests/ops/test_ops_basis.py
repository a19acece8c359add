"""Basis Sharing math (kompakt.ops.basis): the stacked truncation is the group's output error,
the shared factor is one tensor, the per-layer refit only helps, and a group of one is SVD-LLM."""

from __future__ import annotations

import pytest
import torch

from kompakt.ops import svd
from kompakt.ops.basis import group_spectrum, relative_loss, shared_factors


def _group(n: int = 4, noise: float = 0.1, seed: int = 0):
    """n alike weights [32, 48] (a shared part with a decaying spectrum plus noise) and the Grams
    of differently scaled inputs."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(32, 48, generator=gen) @ torch.diag(torch.logspace(0, -2, 48))
    weights = [base + noise * torch.randn(32, 48, generator=gen) for _ in range(n)]
    inputs = [torch.randn(256, 48, generator=gen) * torch.logspace(0, -1, 48) * (i + 1) for i in range(n)]
    return weights, [x.T @ x for x in inputs]


def test_out_side_losses_are_exactly_the_discarded_energy_of_the_stack():
    weights, grams = _group()
    spectrum = group_spectrum(weights, grams, "out", torch.float64)
    factors = shared_factors(weights, grams, "out", 8)
    assert (spectrum.out_features, spectrum.in_features) == (32, 4 * 48)
    assert sum(factors.losses) == pytest.approx(float(spectrum.energy()[8:].sum()), rel=1e-6)
    assert all(u is factors.ups[0] for u in factors.ups) and len({id(d) for d in factors.downs}) == 4


def test_in_side_refit_on_each_layers_own_gram_beats_the_pooled_truncation():
    weights, grams = _group()
    spectrum = group_spectrum(weights, grams, "in", torch.float64)
    factors = shared_factors(weights, grams, "in", 8)
    assert (spectrum.out_features, spectrum.in_features) == (4 * 32, 48)
    assert all(d is factors.downs[0] for d in factors.downs) and factors.downs[0].shape == (8, 48)
    assert sum(factors.losses) < float(spectrum.energy()[8:].sum())  # the pooled whitening's own loss
    assert factors.losses == pytest.approx([relative_loss(w, u, d, g) for w, u, d, g in
                                            zip(weights, factors.ups, factors.downs, grams)])  # fmt: skip


@pytest.mark.parametrize("side", ["in", "out"])
def test_a_group_of_one_is_svd_llm(side):
    weights, grams = _group(n=1)
    ours = shared_factors(weights, grams, side, 8)
    reference = svd.factorize(weights[0], 8, svd.whitening(grams[0]))
    assert ours.losses[0] == pytest.approx(reference.loss, rel=1e-5)
    torch.testing.assert_close(ours.ups[0] @ ours.downs[0], reference.product(), rtol=0, atol=1e-4)


def test_sharing_alike_layers_loses_less_than_separate_bases_at_equal_parameters():
    weights, grams = _group(n=4, noise=0.05)
    shared = shared_factors(weights, grams, "in", 14)  # 14·(48 + 4·32) = 2464 parameters
    separate = [svd.factorize(w, 8, svd.whitening(g)) for w, g in zip(weights, grams)]  # 4·8·(32 + 48) = 2560
    assert sum(shared.losses) < 0.8 * sum(f.loss for f in separate)
