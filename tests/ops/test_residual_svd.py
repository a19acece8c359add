"""residual_factors: the factors of the truncated SVD of (original − shared), in the paper's scaling."""

from __future__ import annotations

import pytest
import torch

from kompakt.ops.residual_svd import residual_factors


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])
def test_factors_are_the_truncated_svd(shape):
    generator = torch.Generator().manual_seed(0)
    original, shared = torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)
    residual = (original - shared).double()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    for rank in (1, 5, min(shape)):
        b, a = residual_factors(original, shared, rank)
        assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1]) and b.dtype == original.dtype
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close((b @ a).double(), best, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.double() @ a.double().T, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-4)
        torch.testing.assert_close(b.double().norm(dim=0), s[:rank], rtol=1e-4, atol=1e-4)  # B = U_r Σ_r
    b, a = residual_factors(original, shared, min(shape))
    torch.testing.assert_close(shared + b @ a, original, rtol=0, atol=1e-4)  # full rank: the original back


def test_a_zero_residual_gives_zero_factors():
    weight = torch.randn(8, 16)
    b, a = residual_factors(weight, weight.clone(), 4)
    assert torch.isfinite(a).all() and torch.equal(b @ a, torch.zeros(8, 16))
