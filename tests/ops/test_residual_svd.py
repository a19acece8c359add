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


def test_large_matrices_take_the_randomized_path_close_to_the_best(monkeypatch):
    """Above RANDOMIZED_ABOVE the top singular pairs come from randomized subspace iteration: on a
    flat spectrum (Gaussian, its hardest case) it keeps at least 99 % of the optimal rank-r energy,
    A's rows stay orthonormal, the factors are the same every call and the caller's random
    stream is untouched. (The threshold is lowered so the test matrix stays small.)"""
    from kompakt.ops import residual_svd

    monkeypatch.setattr(residual_svd, "RANDOMIZED_ABOVE", 128)
    calls = []  # per randomized call, the widths of the bases it multiplied by
    randomized = residual_svd.randomized_factors

    def spy(multiply, multiply_t, like, rank):
        widths = set()
        calls.append(widths)
        return randomized(lambda x: widths.add(x.shape[1]) or multiply(x), multiply_t, like, rank)

    monkeypatch.setattr(residual_svd, "randomized_factors", spy)
    generator = torch.Generator().manual_seed(0)
    original, shared = torch.randn(600, 400, generator=generator), torch.zeros(600, 400)
    s = torch.linalg.svdvals(original.double())
    torch.manual_seed(5)
    before = torch.get_rng_state()
    b, a = residual_factors(original, shared, 16)
    assert torch.equal(torch.get_rng_state(), before)
    again = residual_factors(original, shared, 16)
    assert torch.equal(b, again[0]) and torch.equal(a, again[1])
    torch.testing.assert_close(a.double() @ a.double().T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-4)
    missed = (original.double() - (b @ a).double()).norm() ** 2 - (s[16:] ** 2).sum()
    assert missed / (s[:16] ** 2).sum() < 0.01
    assert calls == [{32}, {32}]  # rank 16 and as many extra columns
    residual_factors(original[:100], shared[:100], 16)  # 100 rows: the exact path
    assert len(calls) == 2
