"""GPTQ: relative quality against RTN, exact codes, GGUF grids, act_order with static groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.ops import ggml_types
from kompakt.ops.gguf_grid import FORMATS, GGUFBlockGrid, dequantize_blocks, pack_blocks, quantize_blocks
from kompakt.ops.gptq import gptq_quantize
from kompakt.ops.hessian import HessianAccumulator
from kompakt.ops.quant import QuantGrid


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(layer, bits, group_size, act_order):
    grid = QuantGrid(bits, group_size, symmetric=True)
    result = gptq_quantize(layer.weight, layer.hessian, grid, act_order=act_order)
    rtn = grid.fake_quantize(layer.weight)
    assert layer.output_error(result.weight) < 0.9 * layer.output_error(rtn)
    # the codes and group parameters reproduce the weight exactly (what a packer stores)
    assert torch.equal(grid.dequantize(result.codes, result.scales, result.zeros), result.weight)
    assert result.scales.shape == (64, grid.n_groups(128)) and result.loss > 0
    assert (result.perm is not None) == act_order


def test_act_order_keeps_groups_contiguous_in_the_original_order(layer):
    grid = QuantGrid(4, 32, symmetric=False)
    result = gptq_quantize(layer.weight, layer.hessian, grid, act_order=True)
    assert result.perm is not None and not torch.equal(result.perm, torch.arange(128))
    assert result.group_size == 32 and result.zeros is not None
    # column j uses group j // 32: decoding each contiguous group with its own params is exact
    for g in range(4):
        cols = slice(32 * g, 32 * g + 32)
        params = (result.scales[:, g : g + 1], result.zeros[:, g : g + 1])
        assert torch.equal(grid.dequantize(result.codes[:, cols], *params), result.weight[:, cols])


def test_partial_last_group(layer_factory):
    layer = layer_factory(out_features=16, in_features=112, n=512)
    grid = QuantGrid(4, 48, allow_partial_group=True)
    result = gptq_quantize(layer.weight, layer.hessian, grid, act_order=True)
    assert result.scales.shape == (16, 3)
    assert torch.equal(grid.dequantize(result.codes, result.scales, result.zeros), result.weight)
    assert layer.output_error(result.weight) < layer.output_error(grid.fake_quantize(layer.weight))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_gguf_blocks_is_exactly_storable(layer, fmt, act_order):
    result = gptq_quantize(layer.weight, layer.hessian, GGUFBlockGrid(fmt), act_order=act_order)
    rtn = dequantize_blocks(*quantize_blocks(layer.weight, fmt), fmt)
    assert layer.output_error(result.weight) < 0.9 * layer.output_error(rtn)
    # the exporter writes (codes, d, m) as they are; llama.cpp's dequantization gives our weight
    stored = pack_blocks(result.codes, result.scales, result.zeros, fmt)
    decoded = ggml_types.dequantize(stored, fmt, tuple(layer.weight.shape))
    assert np.array_equal(decoded.view(np.uint32), result.weight.numpy().view(np.uint32))


def test_dead_inputs_and_a_singular_hessian(layer_factory, caplog):
    layer = layer_factory(out_features=8, in_features=64, n=16)  # n < in: H is singular
    h = layer.hessian.clone()
    h[3, :] = 0.0
    h[:, 3] = 0.0  # input 3 never fires
    result = gptq_quantize(layer.weight, h, QuantGrid(4, 32), percdamp=0.0)
    assert result.damp > 0 and "retrying" in caplog.text
    assert bool(torch.isfinite(result.weight).all())
    assert torch.equal(result.weight[:, 3], torch.zeros(8))


def test_shape_mismatch(layer):
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(layer.weight, layer.hessian[:64, :64], QuantGrid())


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_blocks_do_not_change_the_result(layer_factory, act_order):
    """Group params are fitted on exactly updated weights, so the block size (groups of 48
    straddle blocks of 7 and 128) only changes the float rounding, never a code."""
    layer = layer_factory(out_features=32, in_features=144, n=512)
    grid = QuantGrid(4, 48, symmetric=False)
    lazy = gptq_quantize(layer.weight, layer.hessian, grid, act_order=act_order, block_size=128)
    for block_size in (7, 1):
        other = gptq_quantize(
            layer.weight, layer.hessian, grid, act_order=act_order, block_size=block_size
        )
        assert torch.equal(lazy.codes, other.codes)
        assert torch.allclose(lazy.scales, other.scales, rtol=1e-5, atol=1e-7)


def test_stacked_rows_solve_like_separate_weights(layer):
    """GPTQ treats output rows independently: Linears sharing a Hessian are solved stacked."""
    grid = QuantGrid(4, 32, symmetric=True)
    top, bottom = layer.weight[:40], layer.weight[40:]
    stacked = gptq_quantize(torch.cat([top, bottom]), layer.hessian, grid, act_order=True)
    for rows, weight in ((slice(0, 40), top), (slice(40, None), bottom)):
        alone = gptq_quantize(weight, layer.hessian, grid, act_order=True)
        part = stacked.rows(rows.start, rows.stop or layer.weight.shape[0])
        assert torch.equal(part.weight, alone.weight) and torch.equal(part.codes, alone.codes)
        assert torch.equal(part.scales, alone.scales)
        assert part.loss == pytest.approx(alone.loss, rel=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_weights_and_accumulator_given_separately_solve_the_same(layer, act_order):
    """A list of weights is their stacked rows; an accumulator is its Hessian (taken over in place),
    bit for bit, also with dead inputs and with the Hessian accumulated in fp64."""
    grid = QuantGrid(4, 32, symmetric=True)
    inputs = layer.inputs.clone()
    inputs[:, [3, 90]] = 0.0  # dead inputs
    for dtype in (torch.float32, torch.float64):
        acc = HessianAccumulator(inputs.shape[1], dtype=dtype)
        acc.add_batch(inputs)
        hessian = acc.finalize()
        weights = [layer.weight[:24], layer.weight[24:]]
        given = gptq_quantize(torch.cat(weights), hessian, grid, act_order=act_order)
        taken = gptq_quantize(weights, acc, grid, act_order=act_order)
        assert torch.equal(given.weight, taken.weight) and torch.equal(given.codes, taken.codes)
        assert torch.equal(given.scales, taken.scales) and given.loss == taken.loss
        assert torch.equal(given.weight[:, [3, 90]], torch.zeros(layer.weight.shape[0], 2))
        assert acc.sum_xxt is None  # taken: the accumulator no longer holds a matrix
