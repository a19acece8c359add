"""merge_group: RegMean's closed form, the whitened deltas' optimality, the refits never raising the
output error, exact recovery at full rank, and bad shapes."""

from __future__ import annotations

import pytest
import torch

from kompakt.ops.activation_merge import merge_group

OUT, IN = 24, 40


def _anisotropic_inputs(seed: int, tokens: int = 400) -> torch.Tensor:
    """Inputs [tokens, in] whose channels differ in scale by 100x, as LLM activations do."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, IN, dtype=torch.float64)[torch.randperm(IN, generator=generator)]
    return torch.randn(tokens, IN, generator=generator, dtype=torch.float64) * scales


def _group(n: int = 2):
    generator = torch.Generator().manual_seed(7)
    weights = [torch.randn(OUT, IN, generator=generator, dtype=torch.float64) for _ in range(n)]
    inputs = [_anisotropic_inputs(seed) for seed in range(n)]
    return weights, inputs, [x.T @ x for x in inputs]


def _output_error(weights, inputs, fit) -> float:
    return sum(float(((w - fit.shared - b @ a) @ x.T).square().sum())
               for w, x, (b, a) in zip(weights, inputs, fit.deltas))  # fmt: skip


def test_rank_0_is_regmean_and_equal_inputs_give_the_average():
    weights, inputs, grams = _group(3)
    fit = merge_group(weights, grams, 0, damp=0.0)
    total = sum(grams)
    expected = sum(w @ g for w, g in zip(weights, grams)) @ torch.linalg.inv(total)
    torch.testing.assert_close(fit.shared, expected, rtol=0, atol=1e-8)
    assert all(b.shape == (OUT, 0) for b, _ in fit.deltas)
    same = merge_group(weights, [grams[0]] * 3, 0, damp=0.0)  # one input distribution: the plain mean
    torch.testing.assert_close(same.shared, sum(weights) / 3, rtol=0, atol=1e-8)


def test_the_whitened_delta_beats_the_weight_space_svd_on_the_outputs():
    """Rounds 0: the shared weight is RegMean's; each delta is the best rank-r one for that depth's
    outputs, so it beats the truncated SVD of the weight residual (the paper's init) there."""
    weights, inputs, grams = _group()
    fit = merge_group(weights, grams, 4, rounds=0, damp=0.0)
    for w, x, (b, a) in zip(weights, inputs, fit.deltas):
        u, s, vh = torch.linalg.svd(w - fit.shared, full_matrices=False)
        plain = (u[:, :4] * s[:4]) @ vh[:4]
        ours = float(((w - fit.shared - b @ a) @ x.T).square().sum())
        assert ours < 0.8 * float(((w - fit.shared - plain) @ x.T).square().sum())


def test_refits_never_raise_the_output_error():
    weights, inputs, grams = _group(3)
    errors = [_output_error(weights, inputs, merge_group(weights, grams, 4, rounds=r, damp=0.0)) for r in range(6)]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.95 * errors[0]
    fit = merge_group(weights, grams, 4, rounds=5, damp=0.0)
    totals = [float((w @ x.T).square().sum()) for w, x in zip(weights, inputs)]
    assert sum(e * t for e, t in zip(fit.relative_error, totals)) == pytest.approx(errors[-1], rel=1e-6)


def test_full_rank_recovers_every_depth_and_dtype_is_kept():
    weights, _, grams = _group()
    fit = merge_group([w.float() for w in weights], [g.float() for g in grams], min(OUT, IN), rounds=1)
    assert fit.shared.dtype == torch.float32 and fit.deltas[0][0].dtype == torch.float32
    for w, (b, a) in zip(weights, fit.deltas):
        torch.testing.assert_close(fit.shared.double() + (b @ a).double(), w, rtol=0, atol=1e-3)
    assert max(fit.relative_error) < 1e-6


def test_a_depth_no_input_reached_falls_back_to_the_identity_metric():
    weights, _, grams = _group()
    fit = merge_group(weights, [grams[0], torch.zeros_like(grams[1])], 2)
    assert torch.isfinite(fit.shared).all() and all(torch.isfinite(b).all() for b, _ in fit.deltas)


@pytest.mark.parametrize("weights, grams, rank, needle", [
    ([torch.zeros(4, 6)], [], 1, "one of each per depth"),
    ([torch.zeros(4, 6), torch.zeros(4, 5)], [torch.eye(6), torch.eye(5)], 1, "equal shapes"),
    ([torch.zeros(4, 6)], [torch.eye(4)], 1, "Gram matrices of 6x6"),
    ([torch.zeros(4, 6)], [torch.eye(6)], 5, "rank 5 outside 0..4"),
])  # fmt: skip
def test_bad_shapes_are_refused(weights, grams, rank, needle):
    with pytest.raises(ValueError, match=needle):
        merge_group(weights, grams, rank)


def test_wide_matrices_fit_through_the_factored_randomized_path_as_well_as_the_exact_one(monkeypatch):
    """Above RANDOMIZED_ABOVE (lowered here so the matrices stay small) each whitened delta comes
    from randomized iteration on R and S as two factors, never R·S formed: the output error of the
    whole fit stays within 1 % of the exact eigendecomposition's, the same every call."""
    from kompakt.ops import residual_svd

    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(64, 96, generator=generator, dtype=torch.float64) for _ in range(2)]
    inputs = [torch.randn(300, 96, generator=generator, dtype=torch.float64) * torch.logspace(-1, 1, 96, dtype=torch.float64)
              for _ in range(2)]  # fmt: skip
    grams = [x.T @ x for x in inputs]
    exact = _output_error(weights, inputs, merge_group(weights, grams, 4, rounds=2, damp=0.0))
    monkeypatch.setattr(residual_svd, "RANDOMIZED_ABOVE", 32)
    calls = []
    randomized = residual_svd.randomized_factors
    monkeypatch.setattr("kompakt.ops.activation_merge.randomized_factors",
                        lambda *args: calls.append(args) or randomized(*args))  # fmt: skip
    fit = merge_group(weights, grams, 4, rounds=2, damp=0.0)
    assert len(calls) == 6  # two depths, three delta fits each
    assert _output_error(weights, inputs, fit) <= 1.01 * exact
    again = merge_group(weights, grams, 4, rounds=2, damp=0.0)
    assert torch.equal(fit.shared, again.shared) and torch.equal(fit.deltas[1][0], again.deltas[1][0])
