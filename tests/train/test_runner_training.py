"""Training passes inside a recipe run: distill.kd -> quant.rtn -> quant.qat. QAT picks up the grid
of the packed (compressed-tensors) RTN step, and its own step is stored packed on that grid."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kompakt.model.load import load
from kompakt.model.tiny import save_tiny
from kompakt.ops.quant import QuantGrid
from kompakt.rundir.lineage import read_lineage
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distill_then_quantize_then_qat_in_a_run(tmp_path):
    save_tiny("llama", tmp_path / "tiny")
    words = "the a model layer small token weight data run step of to and in".split()
    rng = random.Random(0)
    (tmp_path / "data.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    train = {"steps": 3, "seq_len": 32, "batch_size": 2, "lr": 1e-3}
    recipe = Recipe.from_dict({
        "model": str(tmp_path / "tiny"), "seed": 1,
        "data": {"calibration": str(tmp_path / "data.txt"), "calibration_blocks": 4, "block_len": 32,
                 "eval_tokens": 256, "window": 64, "stride": 64},
        "steps": [{"distill.kd": train}, {"quant.rtn": {"bits": 4, "group_size": 32}}, {"quant.qat": train}],
    })  # fmt: skip
    result = run_recipe(recipe, tmp_path / "run")
    records = read_lineage(tmp_path / "run")
    assert [r["pass"] for r in records] == ["distill.kd", "quant.rtn", "quant.qat"]
    assert records[0]["details"]["tokens"] == 3 * 2 * 32 and records[0]["details"]["data"].endswith("data.txt")
    assert records[2]["details"]["grid_source"] == "previous quant step"
    config = json.loads((result.final / "config.json").read_text())
    assert config["kompakt_quantization"]["method"] == "qat" and "quantization_config" in config
    final = load(result.final)
    modules = dict(final.model.named_modules())
    grid = QuantGrid(4, 32, True, scale_dtype=torch.float16)
    for name in config["kompakt_quantization"]["modules"]:
        weight = modules[name].weight.detach().float()
        assert torch.equal(grid.fake_quantize(weight), weight), name
    assert not list((tmp_path / "run" / "steps").glob(".ckpt-*"))
