"""Truncated SVD math (kompakt.ops.svd) and the global rank allocation (kompakt.ops.rank_alloc).

The defining properties, not golden numbers: plain SVD's weight error is exactly the discarded
singular values; SVD-LLM's output error on the calibration inputs is exactly its discarded
whitened singular values; on correlated inputs with outlier channels the output error orders
svd-llm <= asvd <= plain; nothing factorizes at or above the break-even rank.
"""

from __future__ import annotations

import pytest
import torch

from kompakt.ops import svd
from kompakt.ops.rank_alloc import Spectrum, allocate_ranks, parameters

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 16


def test_plain_error_is_the_discarded_singular_values(layer):
    factors = svd.factorize(layer.weight, RANK)
    s = torch.linalg.svdvals(layer.weight.double())
    error = (layer.weight.double() - factors.product().double()).norm() ** 2
    assert factors.up.shape == (64, RANK) and factors.down.shape == (RANK, 128)
    assert float(error) == pytest.approx(float(s[RANK:].square().sum()), rel=1e-4)
    assert factors.loss == pytest.approx(float(s[RANK:].square().sum() / s.square().sum()), rel=1e-6)


def test_svd_llm_output_error_is_the_discarded_whitened_singular_values(layer):
    x = layer.inputs.double()
    transform = svd.whitening(x.T @ x)
    assert transform.regularised == 0.0
    s = svd.singular_values(layer.weight, transform)
    factors = svd.factorize(layer.weight, RANK, transform)
    error = ((layer.weight.double() - factors.product().double()) @ x.T).norm() ** 2
    assert float(error) == pytest.approx(float(s[RANK:].square().sum()), rel=1e-3)


def test_output_error_orders_svd_llm_asvd_plain(layer):
    plain = svd.factorize(layer.weight, RANK)
    asvd = svd.factorize(layer.weight, RANK, svd.activation_scaling(layer.inputs.abs().mean(0)))
    svd_llm = svd.factorize(layer.weight, RANK, svd.whitening(layer.hessian))
    errors = [layer.output_error(f.product()) for f in (svd_llm, asvd, plain)]
    assert errors[0] <= errors[1] <= errors[2], errors
    assert errors[0] < 0.9 * errors[2]


def test_a_singular_gram_is_regularised_and_still_factorizes(layer_factory):
    layer = layer_factory(n=32)  # 32 tokens, 128 inputs: XᵀX has rank 32
    gram = layer.inputs.T @ layer.inputs
    transform = svd.whitening(gram)
    assert transform.regularised > 0
    factors = svd.factorize(layer.weight, RANK, transform)
    assert torch.isfinite(factors.product()).all()
    # on the calibration inputs it is still (near) the best: better than plain SVD there
    assert layer.output_error(factors.product()) < layer.output_error(svd.factorize(layer.weight, RANK).product())


def test_break_even():
    assert svd.break_even_rank(64, 128) == pytest.approx(42.67, abs=0.01)
    assert svd.max_rank(64, 128) == 40 and svd.max_rank(64, 64) == 24 and svd.max_rank(8, 8) == 0
    weight = torch.randn(64, 64)
    with pytest.raises(ValueError, match="break-even"):
        svd.factorize(weight, 32)
    assert svd.factorize(weight, 31).rank == 31


def _spectrum(out: int, inp: int, decay: float) -> Spectrum:
    return Spectrum(out, inp, torch.tensor([decay**j for j in range(min(out, inp))], dtype=torch.float64))


def test_allocation_spends_the_budget_where_truncation_loses_least():
    steep, flat = _spectrum(128, 128, 0.7), _spectrum(128, 128, 0.99)
    dense = 2 * 128 * 128
    ranks = allocate_ranks([steep, flat], dense // 2)
    assert parameters([steep, flat], ranks) <= dense // 2
    assert all(r is None or (r % 8 == 0 and r < 64) for r in ranks)
    assert ranks[1] is None or ranks[0] < ranks[1]  # the flat spectrum loses more per dropped rank


def test_allocation_keeps_dense_what_would_reach_break_even_and_refuses_an_impossible_budget():
    small, big = _spectrum(8, 8, 0.99), _spectrum(256, 256, 0.5)
    ranks = allocate_ranks([small, big], 64 + 40 * 512)
    assert ranks[0] is None  # its break-even rank 4 is below the smallest rank 8
    flat = _spectrum(64, 64, 1.0)
    assert allocate_ranks([flat], 64 * 64 - 1) == [24]  # rank 24 fits; break-even 32: never 32
    assert allocate_ranks([flat], 64 * 64) == [None]  # the full budget: dense is the best use
    with pytest.raises(ValueError, match="smallest ranks need"):
        allocate_ranks([big], 8 * 512 - 1)


def test_whitening_on_the_inputs_is_already_svd_llms_closed_form_update(layer):
    """The reference refits U by least squares, min ‖X Wᵀ − (X Aᵀ) Bᵀ‖, on the inputs the compressed
    layers produce; whitening with those inputs' own Gram (what lowrank.svd does on the sequential
    driver) already gives that B, so the refit changes nothing."""
    x = layer.inputs.double()
    factors = svd.factorize(layer.weight, RANK, svd.whitening(x.T @ x))
    refit = torch.linalg.lstsq(x @ factors.down.double().T, x @ layer.weight.double().T).solution.T
    torch.testing.assert_close(refit.float(), factors.up, rtol=1e-3, atol=1e-4)
