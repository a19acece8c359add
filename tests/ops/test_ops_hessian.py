"""Hessian accumulation and the damped inverse Cholesky factor."""

from __future__ import annotations

import logging

import pytest
import torch

from kompakt.errors import DataError
from kompakt.ops.hessian import (
    SYRK_BLOCK,
    HessianAccumulator,
    column_norms_from_hessian,
    drop_dead_columns,
    inverse_cholesky_upper,
    permute_symmetric_,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batches_sum_to_the_one_shot_formula(dtype):
    x = torch.randn(3, 50, 24, generator=torch.Generator().manual_seed(0))  # [batch, seq, in]
    acc = HessianAccumulator(24, dtype=dtype)
    for batch in x:
        acc.add_batch(batch)
    acc.add_batch(x[:1])  # 3-D batches are flattened too
    rows = torch.cat([x.reshape(-1, 24), x[0]]).double()
    expected = 2.0 / rows.shape[0] * rows.T @ rows
    assert acc.n_samples == 200
    assert acc.finalize().dtype == dtype
    assert torch.allclose(acc.finalize().double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(acc.column_norms().double(), rows.norm(dim=0), rtol=1e-5)
    from_h = column_norms_from_hessian(acc.finalize(), 200).double()
    assert torch.allclose(from_h, rows.norm(dim=0), rtol=1e-5)


@pytest.mark.parametrize("width", [SYRK_BLOCK - 1, SYRK_BLOCK, 2 * SYRK_BLOCK + 7])
def test_upper_blocks_only_still_give_the_whole_symmetric_sum(width):
    # add_batch computes the blocks on and above the diagonal; reading the sum mirrors them, and
    # batches added after a read are mirrored again on the next
    g = torch.Generator().manual_seed(2)
    acc = HessianAccumulator(width)
    expected = torch.zeros(width, width)
    for step in range(3):
        x = torch.randn(40, width, generator=g)
        acc.add_batch(x)
        expected.addmm_(x.T, x)
        if step == 1:
            assert torch.allclose(acc.sum_xxt, expected, rtol=1e-5, atol=1e-4)
    total = acc.sum_xxt
    assert torch.equal(total, total.T)
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(acc.take(), expected * (2.0 / 120), rtol=1e-5, atol=1e-5)


def test_empty_and_mismatched_inputs_are_errors():
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="no calibration"):
        acc.finalize()
    with pytest.raises(ValueError, match="8 features"):
        acc.add_batch(torch.zeros(4, 9))


def test_inverse_cholesky_factor(layer):
    upper, damp = inverse_cholesky_upper(layer.hessian.double(), 0.01)
    h = layer.hessian.double()
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    assert damp == 0.01
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-6, atol=1e-8)
    assert torch.equal(upper, upper.triu())


def test_failed_cholesky_retries_with_more_damping(caplog):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))  # rank 4 < 16: singular
    h = 2 / 4 * x.T @ x
    with caplog.at_level(logging.WARNING, logger="kompakt.ops.hessian"):
        upper, damp = inverse_cholesky_upper(h, percdamp=0.0)
    assert damp > 0 and "retrying" in caplog.text
    assert bool(torch.isfinite(upper).all())
    with pytest.raises(DataError, match="calibration data"):
        inverse_cholesky_upper(torch.full((4, 4), float("nan")), 0.01)


def test_dead_columns_are_zeroed_and_made_invertible():
    w = torch.ones(3, 4)
    h = torch.eye(4)
    h[2, 2] = 0.0
    w2, h2 = drop_dead_columns(w, h)
    assert torch.equal(w2[:, 2], torch.zeros(3)) and h2[2, 2] == 1.0
    assert torch.equal(w, torch.ones(3, 4))  # inputs untouched


def test_take_is_finalize_in_place_and_only_once():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(12)
    acc.add_batch(x)
    expected = acc.finalize()
    taken = acc.take()
    assert torch.equal(taken, expected)
    with pytest.raises(ValueError, match="already taken"):
        acc.take()


@pytest.mark.parametrize("n,block", [(10, 3), (9, 9), (7, 1024)])
def test_symmetric_permutation_in_place_equals_the_gather(n, block):
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(n))
    h = x.T @ x
    h = (h + h.T) / 2  # exactly symmetric: a product XᵀX is not on every BLAS
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    expected = h[order][:, order]
    result = permute_symmetric_(h, order, block=block)
    assert result is h and torch.equal(h, expected)


def test_consumed_hessian_gives_the_same_factor_in_its_own_memory(layer):
    kept, damp = inverse_cholesky_upper(layer.hessian, 0.01)
    handed = layer.hessian.clone()
    upper, damp_consumed = inverse_cholesky_upper(handed, 0.01, consume=True)
    assert torch.equal(upper, kept) and damp == damp_consumed and upper.is_contiguous()
    assert upper.data_ptr() == handed.data_ptr()  # no second matrix
    singular = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    h = 2 / 4 * singular.T @ singular
    upper, damp = inverse_cholesky_upper(h.clone(), percdamp=0.0)
    handed = h.clone()
    consumed, damp_consumed = inverse_cholesky_upper(handed, percdamp=0.0, consume=True)
    assert damp == damp_consumed > 0 and torch.equal(upper, consumed)  # retried from the restored diagonal
    assert handed.untyped_storage().nbytes() == 0  # freed once factorised
    with pytest.raises(DataError, match="percdamp"):
        inverse_cholesky_upper(torch.full((4, 4), float("nan")), 0.01, consume=True)
