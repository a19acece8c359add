"""A quant pass's summary and details go into lineage.jsonl once per step: they stay small (counts
per grid, a few names) however many layers the model has. Listing every layer made each record
~15 KB on SmolLM2 (210 Linears)."""

from __future__ import annotations

import json

import pytest
import torch

from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
MAX_RECORD_BYTES = 1500


def _record_bytes(name: str, values: dict, layers: int) -> tuple[int, dict]:
    # down_proj reads 96 inputs: group 64 falls back to 32 in every layer, so each layer gets a note
    loaded = tiny_model("llama", num_hidden_layers=layers, intermediate_size=96)
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIB, seed=0)
    report = spec.apply(ctx, build_config(spec, values))
    return len(json.dumps({"summary": report.summary, "details": report.details})), report.details


@pytest.mark.parametrize("name, values", [
    ("quant.rtn", {"bits": 4, "group_size": 64}),
    ("quant.gptq", {"bits": 4, "group_size": 64, "max_blocks": 2}),
    ("quant.awq", {"bits": 4, "group_size": 64, "max_blocks": 2}),
])  # fmt: skip
def test_report_does_not_grow_with_the_layers(name, values):
    few, few_details = _record_bytes(name, values, layers=4)
    many, many_details = _record_bytes(name, values, layers=16)
    assert many <= MAX_RECORD_BYTES
    assert many - few < 40  # only digits grow (counts, "... (13 more)")
    if name != "quant.awq":
        assert many_details["grids"] == {"int4 g32": 16, "int4 per-channel": 16 * 6}  # hidden 64: one group
        note = many_details["notes"][0]
        assert "(16 layers: model.layers.0.mlp.down_proj" in note and "(13 more)" in note
        assert "model.layers.3.mlp.down_proj" not in note
