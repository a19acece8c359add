"""kompakt.ops.awq: the Gram-matrix objective, scale normalisation, the alpha search (never
worse than no scaling, better with outlier channels) and the clipping search."""

from __future__ import annotations

import torch

from kompakt.ops.awq import awq_scales, output_error, search_clip, search_scales
from kompakt.ops.quant import QuantGrid

GEN = torch.Generator().manual_seed(0)


def _quantizer(bits=3, group=16):
    grid = QuantGrid(bits, group, True)
    return grid.fake_quantize


def _outlier_inputs(n=512, d=64, channels=(3, 40)):
    x = torch.randn(n, d, generator=GEN)
    x[:, list(channels)] *= 25.0
    return x


def test_output_error_matches_direct_computation():
    x = torch.randn(100, 32, generator=GEN)
    delta = torch.randn(8, 32, generator=GEN)
    direct = (x @ delta.T).square().sum()
    assert torch.allclose(output_error(delta, x.T @ x), direct, rtol=1e-4)


def test_awq_scales_normalised():
    act = torch.rand(64, generator=GEN) + 0.1
    s = awq_scales(act, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    assert torch.allclose(awq_scales(act, 0.0), torch.ones(64))


def test_search_scales_helps_with_outlier_channels():
    x = _outlier_inputs()
    w = torch.randn(48, 64, generator=GEN)
    q = _quantizer()
    found = search_scales([w], x.T @ x, x.abs().mean(0), q, n_grid=10)
    assert found.alpha > 0
    assert found.error < 0.9 * found.base_error
    assert torch.isclose(torch.tensor(found.base_error), output_error(w - q(w), x.T @ x), rtol=1e-4)


def test_search_scales_never_worse_and_expand():
    x = torch.randn(256, 32, generator=GEN)
    ws = [torch.randn(16, 32, generator=GEN), torch.randn(8, 32, generator=GEN)]
    expand = torch.arange(32) % 8  # 8 shared scales, each used by 4 columns
    found = search_scales(ws, x.T @ x, torch.rand(8, generator=GEN) + 0.5, _quantizer(), expand=expand)
    assert found.error <= found.base_error
    assert found.scales.shape == (32,) and torch.equal(found.scales[:8], found.scales[8:16])


def test_search_clip_lowers_group_error():
    x = torch.randn(256, 64, generator=GEN)
    w = torch.randn(16, 64, generator=GEN)
    w[:, 5] *= 6  # a heavy-tailed column: clipping pays off
    q, gram = _quantizer(), x.T @ x
    clipped = search_clip(w, gram, q, 16, n_grid=20)
    assert (clipped.abs() <= w.abs() + 1e-6).all()
    block = lambda d: sum(output_error(d[:, g : g + 16], gram[g : g + 16, g : g + 16]) for g in range(0, 64, 16))  # noqa: E731
    assert block(w - q(clipped)) <= block(w - q(w)) + 1e-4
