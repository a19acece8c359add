"""quant.gptq on every tiny family (on-grid weights, save -> reload, GGUF grid), GPTQ beats RTN
at 4 and 3 bits on a model whose inputs are correlated, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kompakt.errors import ConfigError
from kompakt.model.compression import get_state
from kompakt.model.load import load
from kompakt.model.save import save_model
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.ops.quant import QuantGrid
from kompakt.passes.base import PassContext, build_config, get_pass

GPTQ = get_pass("quant.gptq")
RTN = get_pass("quant.rtn")
_GEN = torch.Generator().manual_seed(3)
# Correlated inputs: text-like token streams drawn from a small repeating vocabulary.
_VOCAB = torch.randint(0, 256, (24,), generator=_GEN)
CALIB = _VOCAB[torch.randint(0, 24, (32, 64), generator=_GEN)]
HELDOUT = _VOCAB[torch.randint(0, 24, (8, 64), generator=_GEN)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(spec, loaded, **values):
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIB, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _weights(loaded):
    modules = dict(loaded.model.named_modules())
    return {name: modules[name].weight.detach() for name in get_state(loaded).quantization.modules}


def _logits(loaded, ids=HELDOUT):
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def _kl(reference_logits, loaded) -> float:
    ref = F.log_softmax(reference_logits, -1)
    cand = F.log_softmax(_logits(loaded), -1)
    return float(F.kl_div(cand, ref, log_target=True, reduction="sum") / HELDOUT.numel())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gptq_every_family_on_grid_and_reloads(family, tmp_path):
    loaded = tiny_model(family)
    report = _run(GPTQ, loaded, bits=4, group_size=32, max_blocks=8)
    logits = _logits(loaded)
    assert torch.isfinite(logits).all()
    grid = QuantGrid(4, 32, True)
    for name, w in _weights(loaded).items():
        packed = report.packed_layers[name]
        assert torch.equal(packed.dequantize(), w.float()), name  # stored codes = the model's values
        assert (packed.codes.abs() <= 8).all()
        # on the grid: every group's values are integer multiples of its scale
        ratio = w.float().reshape(w.shape[0], -1, 32) / packed.scale.unsqueeze(-1)
        assert torch.allclose(ratio, ratio.round(), atol=1e-4), name
    assert report.details["calibration_blocks"] == [8, 64]
    reloaded = load(save_model(loaded, tmp_path / "q"))
    assert torch.equal(_logits(reloaded), logits)
    del grid


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_gptq_on_gguf_grid(fmt):
    loaded = tiny_model("gemma3_text")
    _run(GPTQ, loaded, format=fmt, max_blocks=8)
    for name, w in _weights(loaded).items():
        # recoverable exactly: each block is a multiple of an fp16 d (the exporter's contract)
        blocks = w.float().reshape(w.shape[0], -1, 32)
        absmax = blocks.abs().amax(-1, keepdim=True)
        top = 8 if fmt == "q4_0" else 127
        on_grid = torch.zeros(blocks.shape[:2], dtype=torch.bool)
        for k in range(1, top + 1):
            d = (absmax / k).half().float()
            q = blocks / torch.where(d == 0, torch.ones_like(d), d)
            on_grid |= ((q - q.round()).abs() < 1e-3).all(-1) & (q.round().abs() <= top).all(-1)
        assert on_grid.all(), name
    assert get_state(loaded).quantization.format == fmt


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn(family, bits):
    reference = _logits(tiny_model(family))
    rtn = tiny_model(family)
    _run(RTN, rtn, bits=bits, group_size=32)
    gptq = tiny_model(family)
    _run(GPTQ, gptq, bits=bits, group_size=32)
    assert _kl(reference, gptq) < _kl(reference, rtn)


@pytest.mark.parametrize("fmt", ["q4_0", "q5_0", "q5_1", "iq4_nl"])
def test_gptq_beats_rtn_on_gguf_grids(fmt):
    reference = _logits(tiny_model("llama"))
    rtn, gptq = tiny_model("llama"), tiny_model("llama")
    _run(RTN, rtn, format=fmt)
    _run(GPTQ, gptq, format=fmt)
    assert _kl(reference, gptq) < _kl(reference, rtn)


def test_gptq_without_act_order_and_not_true_sequential():
    loaded = tiny_model("mistral")
    report = _run(GPTQ, loaded, bits=3, group_size=None, act_order=False, true_sequential=False, max_blocks=4)
    assert report.details["act_order"] is False and torch.isfinite(_logits(loaded)).all()
    assert report.packed_layers["model.layers.0.mlp.down_proj"].group_size is None


@pytest.mark.parametrize(
    "values, message",
    [({"bits": 1}, "bits 1"), ({"percdamp": -0.1}, "percdamp"), ({"block_size": 0}, "at least 1"),
     ({"format": "nf4"}, "unknown GGUF type .nf4.")],
)  # fmt: skip
def test_bad_configs(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(GPTQ, values)


def test_gptq_after_rtn_is_refused():
    loaded = tiny_model("llama")
    _run(RTN, loaded, bits=8)
    with pytest.raises(ConfigError, match="already quantized"):
        _run(GPTQ, loaded, bits=4)


def test_gptq_modules_subset_uses_the_shared_hessian():
    loaded = tiny_model("llama")
    q_before = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _run(GPTQ, loaded, bits=4, group_size=32, modules=["attn.k", "mlp.up"], max_blocks=4)
    names = get_state(loaded).quantization.modules
    assert len(names) == 8 and all(n.endswith(("k_proj", "up_proj")) for n in names)
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, q_before)  # collected, not changed


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_gptq_gguf_grid_exports_without_re_rounding(fmt, tmp_path):
    from kompakt.export.gguf import write_gguf

    loaded = tiny_model("llama")
    _run(GPTQ, loaded, format=fmt, max_blocks=8)
    result = write_gguf(loaded, tmp_path / "m.gguf", type=fmt)
    assert result.exact_grid_tensors == 28 and result.requantized_blocks == 0
