"""quant.gptq with `awq: true`: AWQ and GPTQ in one calibration run equal quant.awq then
quant.gptq as two steps wherever the two see the same inputs, and report what AWQ did."""

from __future__ import annotations

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.compression import AwqScaling, get_state
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

GPTQ = get_pass("quant.gptq")
AWQ = get_pass("quant.awq")
_GEN = torch.Generator().manual_seed(3)
_VOCAB = torch.randint(0, 256, (24,), generator=_GEN)
CALIB = _VOCAB[torch.randint(0, 24, (12, 48), generator=_GEN)]
GRID = {"bits": 4, "group_size": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(spec, loaded, **values):
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIB, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _differing(a, b) -> list[str]:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return [name for name in sa if not torch.equal(sa[name], sb[name])]


@pytest.mark.parametrize("family, grid", [("llama", GRID), ("phi3", GRID), ("gemma3_text", {"format": "q4_0"})])
def test_one_run_equals_two_steps(family, grid):
    """Layer 0 sees the same inputs either way, so it is bit-identical; later layers differ by
    design: in one run AWQ scales layer i on the outputs of the already *quantized* layers before
    it (as llm-compressor's pipeline does), in two steps on those of the float model."""
    two = tiny_model(family, num_hidden_layers=2)
    _run(AWQ, two, **grid)
    _run(GPTQ, two, **grid)
    one = tiny_model(family, num_hidden_layers=2)
    report = _run(GPTQ, one, **grid, awq=True)
    differing = _differing(one, two)
    assert differing and all(".layers.1." in name for name in differing), differing
    assert "awq first: 8 scaling points" in report.summary
    assert report.details["awq"]["scales"]["points"] == 8
    assert get_state(one).awq == AwqScaling(grid=get_state(two).awq.grid, clip=True)
    assert set(report.packed_layers) == set(_run(GPTQ, tiny_model(family, num_hidden_layers=2), **grid).packed_layers)


def test_one_layer_model_is_bit_identical():
    two = tiny_model("qwen3", num_hidden_layers=1)
    _run(AWQ, two, **GRID)
    _run(GPTQ, two, **GRID)
    one = tiny_model("qwen3", num_hidden_layers=1)
    _run(GPTQ, one, **GRID, awq=True)
    assert not _differing(one, two)


def test_awq_blocks_uses_fewer_blocks():
    full = tiny_model("llama", num_hidden_layers=1)
    _run(GPTQ, full, **GRID, awq=True, batch_size=4)
    few = tiny_model("llama", num_hidden_layers=1)
    report = _run(GPTQ, few, **GRID, awq=True, awq_blocks=4, batch_size=4)
    assert report.details["awq"]["blocks"] == 4 and _differing(full, few)


def test_awq_keeps_its_groups_when_gptq_does_not():
    report = _run(GPTQ, tiny_model("llama", num_hidden_layers=1), **GRID, awq=True, true_sequential=False)
    assert report.details["awq"]["scales"]["points"] == 4  # qkv, v->o, gate/up, up->down


@pytest.mark.parametrize("values", [{"awq_blocks": 4}, {"awq": True, "awq_blocks": 0}])
def test_bad_awq_options(values):
    with pytest.raises(ConfigError, match="awq_blocks"):
        build_config(GPTQ, {**GRID, **values})


