"""`compress --target params=F` plans the shape `kompakt search` measured best (kompakt.auto.searched_shape),
end to end on a tiny llama, and falls back to the width rule, saying why, where no search can run."""

from __future__ import annotations

import json

import pytest

from kompakt.auto.api import compress_auto
from kompakt.auto.search.for_plan import search_shape
from kompakt.auto.target import parse_target
from kompakt.model.load import load
from kompakt.model.tiny import save_tiny
from kompakt.recipe.schema import DataSpec

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = {"calibration_blocks": 8, "block_len": 64, "eval_tokens": 512, "window": 64, "stride": 64}


@pytest.fixture(scope="module")
def text(laptop_text):
    return laptop_text


def test_params_target_cuts_the_searched_winner_then_heals(tmp_path, text):
    save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "run"
    result = compress_auto(str(tmp_path / "tiny"), target="params=0.5,max-kl=10", data=str(text), out=out,
                           data_sizes=SIZES)  # fmt: skip
    searched = json.loads((out / "search" / "search.json").read_text())
    proxied = [r for r in searched["candidates"] if r["proxy"]]
    assert len(proxied) >= 2 and all(r["final"] is None for r in proxied)  # proxies only: the plan heals
    winner = next(r for r in proxied if r["index"] == searched["winner"])
    assert winner["proxy"]["kl_mean"] == min(r["proxy"]["kl_mean"] for r in proxied)
    plan = json.loads((out / "plan.json").read_text())
    first = plan["attempts"][0]
    assert first["steps"][:-1] == winner["steps"] and "distill.kd" in first["steps"][-1]
    assert any(f"{len(proxied)} shapes searched" in c and winner["describe"] in c for c in plan["choices"])
    assert result.attempt == 0 and load(result.final).num_parameters() == winner["params"]


def test_a_model_the_search_cannot_reshape_keeps_the_width_rule(tmp_path, text):
    save_tiny("olmoe", tmp_path / "moe")
    choices: list[str] = []
    spec = DataSpec(calibration=str(text), **SIZES)
    found = search_shape(str(tmp_path / "moe"), parse_target("params=0.5"), str(text), spec, tmp_path / "run", None, 0, choices)
    assert found is None and len(choices) == 1
    assert "no shape search (search reshapes dense decoders" in choices[0] and choices[0].endswith("the width rule instead")
    assert not (tmp_path / "run" / "search").exists()
