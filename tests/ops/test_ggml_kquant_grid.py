"""GPTQ on llama.cpp's K-quant grids: the file bytes hold exactly GPTQ's weights, and beat RTN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.ops import ggml_types
from kompakt.ops.ggml_kquant_grid import KQuantGrid
from kompakt.ops.ggml_kquants import KQUANT_TYPES, quantize_kquant
from kompakt.ops.gptq import gptq_quantize


@pytest.fixture(scope="module")
def wide_layer(layer_factory):
    """Two super-blocks per row: out 32, in 512, correlated inputs with outlier channels."""
    return layer_factory(out_features=32, in_features=512, n=2048, seed=1)


@pytest.mark.parametrize("name", KQUANT_TYPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_bytes_decode_to_its_weights_and_beat_rtn(wide_layer, name, act_order):
    grid = KQuantGrid(name)
    result = gptq_quantize(wide_layer.weight, wide_layer.hessian, grid, act_order=act_order)
    stored = grid.pack(result.codes, result.stored)
    decoded = ggml_types.dequantize(stored, name, tuple(wide_layer.weight.shape))
    assert np.array_equal(decoded, result.weight.numpy())  # what llama.cpp computes with
    rtn = ggml_types.fake_quantize(wide_layer.weight.numpy(), name)
    rtn_error = wide_layer.output_error(torch.from_numpy(rtn))
    assert wide_layer.output_error(result.weight) < 0.9 * rtn_error  # ~0.6 measured


@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_without_error_feedback_gptq_writes_llama_quantize_bytes(name):
    # An identity Hessian spreads no error, so every super-block is fitted on the original
    # weights and every column rounded like the reference's final pass.
    w = torch.from_numpy(np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32))
    grid = KQuantGrid(name)
    result = gptq_quantize(w, torch.eye(512), grid, percdamp=0.0)
    assert np.array_equal(grid.pack(result.codes, result.stored), quantize_kquant(w.numpy(), name))


def test_params_vary_per_sub_block_and_rows_must_fit():
    grid = KQuantGrid("Q4_K")
    w = torch.randn(4, 256)
    w[:, :32] *= 10  # a loud first sub-block gets a larger scale than the rest
    params = grid.fit(w)
    assert params.scale.shape == (4, 8) and params.stored.shape == (4, 16)
    assert torch.all(grid.column_params(params, 0).scale > grid.column_params(params, 255).scale)
    with pytest.raises(ValueError, match="multiple of 256"):
        grid.group_size_for(576)
    with pytest.raises(ValueError, match="unknown K-quant"):
        KQuantGrid("q4_0")
