"""quant.awq on every tiny family: the float function is kept (norm / Gemma (1+w) / v->o with
GQA / up->down folds), AWQ + RTN beats RTN on a model with outlier activation channels,
composition with GPTQ, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, norm_modules
from kompakt.model.compression import AwqScaling, get_state
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

AWQ, RTN, GPTQ = get_pass("quant.awq"), get_pass("quant.rtn"), get_pass("quant.gptq")
_GEN = torch.Generator().manual_seed(5)
CALIB = torch.randint(0, 256, (16, 64), generator=_GEN)
HELDOUT = torch.randint(0, 256, (8, 64), generator=_GEN)
OUTLIERS = [3, 17, 30, 45]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(spec, loaded, **values):
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIB, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(input_ids=HELDOUT).logits


def _kl(reference_logits, loaded) -> float:
    ref = F.log_softmax(reference_logits, -1)
    cand = F.log_softmax(_logits(loaded), -1)
    return float(F.kl_div(cand, ref, log_target=True, reduction="sum") / HELDOUT.numel())


def _with_outliers(loaded):
    """Outlier input features as in real LLMs: 4 hidden channels get 10x larger pre-norm gains."""
    spec = arch_for(loaded.model)
    with torch.no_grad():
        for layer in decoder_layers(loaded.model):
            for role, norm in norm_modules(layer, spec).items():
                if role in ("attn.pre", "mlp.pre"):
                    w = norm.weight
                    w[OUTLIERS] = (w[OUTLIERS] + spec.norm_offset) * 10 - spec.norm_offset
    return loaded


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_awq_keeps_the_float_function(family):
    loaded = _with_outliers(tiny_model(family))
    before = _logits(loaded)
    report = _run(AWQ, loaded, bits=3, group_size=32, clip=False)
    assert torch.allclose(_logits(loaded), before, atol=1e-4, rtol=1e-4)
    assert report.details["scales"]["points"] == 16  # 4 layers x (qkv, v->o, gate/up, up->down)
    assert not report.details["notes"]
    assert report.details["scales"]["alpha_max"] > 0
    state = get_state(loaded)
    assert state.quantization is None and not report.packed_layers  # AWQ does not quantize
    assert state.awq == AwqScaling(grid="int3 g32 sym", clip=False)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_awq_then_rtn_beats_rtn_with_outliers(family):
    reference = _logits(_with_outliers(tiny_model(family)))
    rtn = _with_outliers(tiny_model(family))
    _run(RTN, rtn, bits=3, group_size=32)
    awq = _with_outliers(tiny_model(family))
    _run(AWQ, awq, bits=3, group_size=32)
    _run(RTN, awq, bits=3, group_size=32)
    assert _kl(reference, awq) < _kl(reference, rtn)


def test_awq_composes_with_gptq_on_q4_0():
    loaded = _with_outliers(tiny_model("qwen2"))
    reference = _logits(loaded)
    _run(AWQ, loaded, format="q4_0")
    report = _run(GPTQ, loaded, format="q4_0")
    assert "gptq q4_0" in report.summary
    assert _kl(reference, loaded) < 1.0


def test_grid_mismatch_warns(caplog):
    loaded = tiny_model("llama")
    _run(AWQ, loaded, bits=4, group_size=32, clip=False)
    with caplog.at_level("WARNING"):
        _run(RTN, loaded, bits=3, group_size=32)
    assert "AWQ searched its scales for int4 g32 sym" in caplog.text


@pytest.mark.parametrize(
    "values, message",
    [({"bits": 6}, "bits 6"), ({"max_shrink": 1.0}, "max_shrink"), ({"n_grid": 0}, "at least 1"),
     ({"then": "rtn"}, "unknown field")],
)  # fmt: skip
def test_bad_configs(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(AWQ, values)


def test_awq_on_quantized_model_is_refused():
    loaded = tiny_model("llama")
    _run(RTN, loaded, bits=4)
    with pytest.raises(ConfigError, match="already quantized"):
        _run(AWQ, loaded, bits=4)
