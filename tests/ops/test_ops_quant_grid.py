"""QuantGrid: the explicit RTN grid (codes, scales, zeros) that RTN and GPTQ share."""

from __future__ import annotations

import pytest
import torch

from kompakt.ops.quant import QuantGrid, fake_quantize, group_bounds


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.1


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_symmetric_grid_matches_fake_quantize(weight, bits, group_size):
    grid = QuantGrid(bits, group_size, symmetric=True)
    q, scale, zero = grid.quantize(weight)
    assert zero is None
    assert q.dtype == torch.int32 and q.shape == weight.shape
    assert scale.shape == (16, grid.n_groups(128))
    assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    expected = fake_quantize(weight, bits, group_size, True)
    assert torch.equal(grid.dequantize(q, scale, zero), expected)


def test_asymmetric_zero_point_is_a_storable_integer(weight):
    grid = QuantGrid(4, 32, symmetric=False)
    positive = weight.abs() + 0.01  # every group above 0: the range is widened to contain 0
    q, scale, zero = grid.quantize(positive)
    assert zero is not None and zero.shape == scale.shape
    assert torch.equal(zero, zero.round()) and int(zero.min()) >= 0 and int(zero.max()) <= 15
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    # 0 is exactly representable, and RTN error is at most half a step
    deq = grid.dequantize(q, scale, zero)
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((deq - positive).abs() <= step / 2 + 1e-7).all())


def test_uneven_group_size_is_rejected_by_default(weight):
    with pytest.raises(ValueError, match="does not divide the input dimension 128"):
        QuantGrid(4, 48).quantize(weight)


def test_uneven_group_size_gives_a_shorter_last_group_when_allowed(weight):
    grid = QuantGrid(4, 48, allow_partial_group=True)
    assert group_bounds(128, 48) == [(0, 48), (48, 96), (96, 128)]
    q, scale, _ = grid.quantize(weight)
    assert scale.shape == (16, 3)
    # the last group's scale comes from its own 32 columns only
    last = weight[:, 96:]
    extreme = last.gather(1, last.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.allclose(scale[:, 2], extreme / -8)
    assert torch.equal(grid.dequantize(q, scale, None), grid.fake_quantize(weight))


def test_scale_dtype_rounds_scales_to_the_stored_dtype(weight):
    q, scale, _ = QuantGrid(4, 32, scale_dtype=torch.float16).quantize(weight)
    assert torch.equal(scale, scale.half().float())


def test_all_zero_group_and_bad_bits():
    w = torch.zeros(2, 64)
    w[1, 32:] = 1.0
    grid = QuantGrid(4, 32)
    assert torch.equal(grid.fake_quantize(w), w)
    with pytest.raises(ValueError, match="bits"):
        QuantGrid(bits=1)


def test_symmetric_grid_puts_the_extreme_weight_exactly_on_the_lowest_code():
    # llama.cpp's q4_0 rule: all 16 levels used, the largest-magnitude weight exact, either sign
    w = torch.tensor([[0.1, -0.3, 0.7, 0.2], [0.1, -0.9, 0.4, 0.2]])
    q, scale, _ = QuantGrid(4, None).quantize(w)
    assert q[0, 2] == -8 and q[1, 1] == -8
    assert torch.allclose(scale[:, 0], torch.tensor([0.7 / -8, -0.9 / -8]))
    back = QuantGrid(4, None).dequantize(q, scale, None)
    assert back[0, 2] == pytest.approx(0.7) and back[1, 1] == pytest.approx(-0.9)
    assert (back - w).abs().max() <= scale.abs().max() / 2 + 1e-6
