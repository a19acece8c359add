"""EoRA's eigenspace correction (kompakt.ops.error_compensation): it lowers the output error more
than a plain SVD of the weight error at the same rank when the inputs are correlated, takes the
reference in the quantized coordinates when AWQ rescaled the inputs, and the global allocation spends
its budget where the relative error is largest."""

from __future__ import annotations

import torch

from kompakt.ops.error_compensation import (allocate_ranks, channel_gains, output_error, plain_svd, quantized_coordinates,
                                            whitened_svd)

_GEN = torch.Generator().manual_seed(0)


def _inputs(n: int = 2048, width: int = 48) -> torch.Tensor:
    """Correlated, anisotropic inputs [n, width]: a few strong directions, as LLM activations."""
    basis = torch.randn(width, width, generator=_GEN)
    scales = torch.logspace(1, -2, width)
    return (torch.randn(n, width, generator=_GEN) * scales) @ basis


def _quantize(w: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Per-row symmetric round to nearest: an error of the size real quantizers leave."""
    scale = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    return (w / scale).round() * scale


def _out_err(delta: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ delta.T).square().sum())


def test_eigenspace_correction_beats_plain_svd_and_no_correction():
    x = _inputs()
    w = torch.randn(32, 48, generator=_GEN)
    w_q = _quantize(w)
    error, space = output_error(w, w_q, x.T @ x / x.shape[0], damp=0.0)
    torch.testing.assert_close(error, (w - w_q).double())  # same inputs: EoRA's E = W - W_q exactly
    spectrum = whitened_svd(error, space, 8)
    for rank in (2, 4, 8):
        b, a = spectrum.factors(rank)
        pb, pa = plain_svd(w - w_q, rank)
        eora = _out_err(w - w_q - b @ a, x)
        plain = _out_err(w - w_q - pb @ pa, x)
        assert eora < plain < _out_err(w - w_q, x), (rank, eora, plain)
        # the discarded singular values are the error left, per token
        assert abs(spectrum.left_error(rank) - eora / x.shape[0]) < 1e-3 * spectrum.total_energy


def test_rescaled_inputs_are_compared_in_the_quantized_coordinates():
    """AWQ: the quantized layer reads x / s and holds Q(W diag(s)); the measured gains recover s
    and the correction fits W x_o, which comparing W with W_q directly gets badly wrong."""
    x_o = _inputs()
    s = torch.rand(48, generator=_GEN) * 3 + 0.5
    x_q = x_o / s
    w = torch.randn(32, 48, generator=_GEN)
    w_q = _quantize(w * s)
    n = x_o.shape[0]
    covariance = x_q.T @ x_q / n
    gains = channel_gains(x_o.square().sum(0) / n, covariance.diagonal())
    torch.testing.assert_close(gains, s, rtol=1e-4, atol=1e-5)
    target = x_o @ w.T

    def left(g):
        error, space = output_error(w, w_q, covariance, g)
        b, a = whitened_svd(error, space, 4).factors(4)
        return float((target - x_q @ (w_q + b @ a).T).square().sum())

    none = float((target - x_q @ w_q.T).square().sum())
    assert left(gains) < none < left(None)


def test_rows_awq_folded_into_are_taken_in_the_quantized_coordinates():
    """v_proj / up_proj hold diag(1/s_out) W diag(s_in): the reference gets both sides."""
    weight = torch.randn(6, 8)
    scales = torch.rand(6) + 0.5  # AWQ's 1/s folded into the rows, s on the columns
    gains = torch.rand(8) + 0.5
    folded = (weight * gains) * scales[:, None]
    torch.testing.assert_close(quantized_coordinates(weight, folded, gains).float(), folded)
    assert torch.equal(quantized_coordinates(weight, folded, None), weight.double())


def test_global_allocation_follows_the_relative_error_within_budget():
    x = _inputs()
    cov = x.T @ x / x.shape[0]
    spectra = {}
    for name, bits in (("coarse", 2), ("fine", 6)):
        w = torch.randn(32, 48, generator=_GEN)
        error, space = output_error(w, _quantize(w, bits), cov)
        energy = float(((w.double() @ cov.double()) * w.double()).sum())
        spectra[name] = whitened_svd(error, space, 16, energy)
    budget = 8 * 2 * (32 + 48)  # uniform rank 8 on both
    ranks = allocate_ranks(spectra, budget, max_rank=16)
    assert sum(r * (32 + 48) for r in ranks.values()) <= budget
    assert ranks["coarse"] > ranks["fine"]
    left = sum(spec.left_error(ranks[name]) / spec.reference_energy for name, spec in spectra.items())
    uniform = sum(spec.left_error(8) / spec.reference_energy for spec in spectra.values())
    assert left <= uniform
