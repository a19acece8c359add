"""q5_0, q5_1 and iq4_nl end to end: GPTQ on the grid -> GGUF holding exactly GPTQ's values ->
llama.cpp runs it and agrees with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.export import write_gguf
from kompakt.export.gguf_grid_recover import recover_blocks
from kompakt.export.gguf_tensors import _permute
from kompakt.model.compression import get_state
from kompakt.model.tiny import tiny_model
from kompakt.ops import ggml_types
from kompakt.ops.gguf_grid import dequantize_blocks
from kompakt.passes.base import PassContext, build_config, get_pass

gguf = pytest.importorskip("gguf")
NEW = ("q5_0", "q5_1", "iq4_nl")

pytestmark = pytest.mark.usefixtures("one_thread")


def _off_grid_edges(fmt: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """On-grid weights whose blocks mostly avoid the codes llama.cpp's own rule would pin
    (the extreme code, code 0), as GPTQ's error feedback leaves them."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    n_blocks = in_features // 32
    d = (torch.rand(out_features, n_blocks, generator=gen) * 0.01 + 1e-3).half().float()
    m = None
    if fmt == "iq4_nl":
        codes = torch.randint(2, 14, shape, generator=gen, dtype=torch.int32)
        d = torch.where(torch.rand(d.shape, generator=gen) < 0.5, -d, d) / 100  # both signs
    elif fmt == "q5_1":
        codes = torch.randint(3, 29, shape, generator=gen, dtype=torch.int32)
        m = (-torch.rand(out_features, n_blocks, generator=gen) * 0.2).half().float()
    else:
        codes = torch.randint(2, 30, shape, generator=gen, dtype=torch.int32)
    return dequantize_blocks(codes, d.half().float(), m, fmt)


@pytest.mark.parametrize("fmt", (*NEW, "q4_1"))
def test_on_grid_blocks_are_recovered_exactly(fmt):
    if fmt == "q4_1":  # codes 1..14: the search that q5_1 needs helps q4_1 too
        gen = torch.Generator().manual_seed(1)
        codes = torch.randint(1, 15, (64, 128), generator=gen, dtype=torch.int32)
        d = (torch.rand(64, 4, generator=gen) * 0.01 + 1e-3).half().float()
        w = dequantize_blocks(codes, d, (-torch.rand(64, 4, generator=gen)).half().float(), fmt)
    else:
        w = _off_grid_edges(fmt, (64, 128))
    reference = ggml_types.fake_quantize(w.numpy(), fmt)
    assert not np.array_equal(reference, w.numpy())  # llama.cpp's rounding would move weights
    q, d, m, missed = recover_blocks(w, fmt)
    assert missed == 0
    assert torch.equal(dequantize_blocks(q, d, m, fmt), w)


def test_blocks_off_the_grid_are_counted_and_requantized():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    q, d, m, missed = recover_blocks(w, "iq4_nl")
    assert missed == 8
    assert np.array_equal(dequantize_blocks(q, d, m, "iq4_nl").numpy(), ggml_types.fake_quantize(w.numpy(), "iq4_nl"))


def _gptq(fmt: str):
    loaded = tiny_model("llama")
    spec = get_pass("quant.gptq")
    calib = torch.randint(3, 261, (16, 64), generator=torch.Generator().manual_seed(1))
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: calib, seed=0)
    spec.apply(ctx, build_config(spec, {"format": fmt, "max_blocks": 8}))
    return loaded


@pytest.mark.parametrize("fmt", NEW)
def test_gptq_grid_is_written_with_exactly_its_values(fmt, tmp_path):
    reference = tiny_model("llama")
    loaded = _gptq(fmt)
    quantization = get_state(loaded).quantization
    assert quantization.format == fmt and len(quantization.modules) == 28
    result = write_gguf(loaded, tmp_path / f"m-{fmt}.gguf", type=fmt)
    assert result.exact_grid_tensors == 28 and result.requantized_blocks == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(result.path)).tensors}
    config = loaded.model.config
    for name in quantization.modules:
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        gguf_name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}[rest]  # fmt: skip
        tensor = tensors[f"blk.{layer}.{gguf_name}.weight"]
        assert tensor.tensor_type.name.lower() == fmt
        weight = loaded.model.get_submodule(name).weight.detach().float()
        if gguf_name == "attn_q":
            weight = _permute(weight, config.num_attention_heads)
        elif gguf_name == "attn_k":
            weight = _permute(weight, config.num_key_value_heads)
        stored = ggml_types.dequantize(np.asarray(tensor.data), fmt, tuple(weight.shape))
        assert np.array_equal(stored, weight.numpy()), name  # (a zero's sign may differ: same product)
    assert not torch.equal(reference.model.model.layers[0].mlp.up_proj.weight, loaded.model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("fmt", NEW)
def test_the_export_runs_in_llama_cpp_and_agrees_with_the_model(fmt, tmp_path):
    """The export check of `kompakt export` (llama.cpp against the model on held-out text)."""
    pytest.importorskip("llama_cpp")
    from kompakt.export.check import MIN_TOP1, run_check

    loaded = _gptq(fmt)
    loaded.name = "tiny"  # llama.cpp special-cases names containing "phi3"
    path = write_gguf(loaded, tmp_path / f"m-{fmt}.gguf", type=fmt).path
    check = run_check(loaded, path, format="gguf", type=fmt)
    assert check.passed and check.threshold == MIN_TOP1[fmt] and check.top1 >= MIN_TOP1[fmt] + 0.2, check.line()
