"""llama.cpp block formats: bit-exact against the reference quantizer (gguf-py, ggml_iq4nl)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.ops import ggml_types
from kompakt.ops.gguf_grid import FORMATS, GGUFBlockGrid, dequantize_blocks, pack_blocks, quantize_blocks


def _awkward_weight() -> torch.Tensor:
    """Random rows plus the blocks where rounding conventions differ."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen) * 0.05
    w[0, :32] = 0.0  # all-zero block (d = 0)
    w[1, :32] = torch.linspace(-1, 1, 32)  # ties of |max| between +1 and -1, exact halves
    w[2, :32] = torch.arange(32) / 4.0 - 4.0  # many values exactly on .5 boundaries
    w[3, 32:64] = 1e-6  # constant block (q4_1: d = 0)
    w[4, 64] = 30.0  # one outlier
    w[5, 96:128] = -torch.rand(32, generator=gen)  # all negative
    w[6, 128:160] = 1e-9 * torch.randn(32, generator=gen)  # d underflows fp16
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_blocks_is_bit_exact_with_the_reference(fmt):
    w = _awkward_weight()
    q, d, m = quantize_blocks(w, fmt)
    reference = ggml_types.quantize(w.numpy(), fmt)
    assert np.array_equal(pack_blocks(q, d, m, fmt), reference)
    ours = dequantize_blocks(q, d, m, fmt).numpy()
    theirs = ggml_types.dequantize(reference, fmt, tuple(w.shape))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_grid_decodes_like_the_reference_and_stays_close(fmt):
    w = _awkward_weight()
    grid = GGUFBlockGrid(fmt)
    q_ref, d_ref, m_ref = quantize_blocks(w, fmt)
    for block in range(w.shape[1] // 32):
        cols = slice(32 * block, 32 * block + 32)
        params = grid.fit(w[:, cols])
        assert torch.equal(params.scale, d_ref[:, block])  # same fp16 d (and m) as the reference
        if m_ref is not None:
            assert torch.equal(params.zero, m_ref[:, block])
        codes = grid.encode(w[:, cols], params)
        ref_values = dequantize_blocks(q_ref, d_ref, m_ref, fmt)[:, cols]
        ours = grid.decode(codes, params)
        # nearest on the stored grid: never farther from w than the reference's choice
        assert bool(((ours - w[:, cols]).abs() <= (ref_values - w[:, cols]).abs() + 1e-12).all())


def test_rows_must_be_a_multiple_of_32_and_formats_are_known():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(torch.zeros(2, 48), "q4_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        GGUFBlockGrid("q8_0").group_size_for(48)
    with pytest.raises(ValueError, match="q4_k"):
        GGUFBlockGrid("q4_k")


def test_pack_rejects_scales_that_are_not_fp16_values():
    q, d, _ = quantize_blocks(torch.randn(2, 32), "q8_0")
    with pytest.raises(ValueError, match="fp16"):
        pack_blocks(q, d + 1e-6, None, "q8_0")
