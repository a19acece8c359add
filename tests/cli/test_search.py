"""CLI: `kompakt search` end to end on a tiny model, its resume, and its one-line refusals."""

from __future__ import annotations

import json

import pytest

from kompakt.model.load import load
from kompakt.model.tiny import save_tiny

TEXT = "The quick brown fox jumps over the lazy dog. " * 400
FAST = ("--candidates", "3", "--finalists", "2", "--proxy-tokens", "256", "--heal-tokens", "512", "--eval-tokens", "256")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    save_tiny("llama", root / "model")
    (root / "calib.txt").write_text(TEXT)
    return root / "model", root / "calib.txt"


def test_search_end_to_end_then_resume(tiny, tmp_path, cli):
    model, text = tiny
    out = tmp_path / "run"
    args = ("search", str(model), "--target", "params=0.5", "--data", str(text), "--out", str(out), "--no-latency", "--lr", "3e-4", *FAST)
    code, printed, err = cli([*args])
    assert code == 0, err
    assert "winner:" in printed and "pareto set" in printed
    found = json.loads((out / "search.json").read_text())
    rows = found["candidates"]
    assert len(rows) == 3 and all(r["proxy"]["kl_mean"] is not None for r in rows)
    finalists = [r for r in rows if r["finalist"]]
    assert len(finalists) == 2 and all(r["final"]["tokens"] == 512 for r in finalists)
    ranked = sorted(rows, key=lambda r: r["proxy"]["kl_mean"])
    assert {r["index"] for r in finalists} == {r["index"] for r in ranked[:2]}  # the proxy chose them
    winner = min(finalists, key=lambda r: r["final"]["kl_mean"])
    assert found["winner"] == winner["index"] and found["pareto"] and found["why"].startswith(f"candidate {winner['index']}")
    assert load(out / "final").num_parameters() == winner["params"]  # the kept model has the searched shape
    assert "distill.kd" in (out / "recipe.yaml").read_text()
    lineage = (out / "candidates" / str(winner["index"]) / "lineage.jsonl").read_text()
    kd = [json.loads(line)["config"] for line in lineage.splitlines() if json.loads(line)["pass"] == "distill.kd"]
    assert len(kd) == 2 and all(config["lr"] == 3e-4 for config in kd)  # --lr reaches the proxy and the healing
    code, _, err = cli([*args])  # a rerun resumes: nothing is trained again
    assert code == 0, err
    assert (out / "candidates" / str(winner["index"]) / "lineage.jsonl").read_text() == lineage
    assert json.loads((out / "search.json").read_text())["winner"] == winner["index"]


@pytest.mark.parametrize(("extra", "needle"), [
    (("--budget", "1s"), "too small for one candidate"),
    (("--target", "size=4x"), "params="),
    (("--target", "params=0.1"), "no uniform shape"),
    (("--candidates", "0"), "at least 1"),
    (("--lr", "0"), "--lr must be > 0"),
])  # fmt: skip
def test_bad_input_exits_2_before_work(tiny, tmp_path, cli, extra, needle):
    model, text = tiny
    out = tmp_path / "run"
    code, _, err = cli(["search", str(model), "--data", str(text), "--out", str(out), *extra])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_missing_model_and_foreign_out(tiny, tmp_path, cli):
    code, _, err = cli(["search", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = cli(["search", str(tiny[0]), "--data", str(tiny[1]), "--out", str(foreign)])
    assert code == 2 and "--out" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
