"""The runner: step dirs, lineage, report, final link, resume, ownership, gates."""

from __future__ import annotations

import importlib
import json
import os

import pytest
from recipe_helpers import CALLS, small_data
from transformers import AutoModelForCausalLM

from kompakt.errors import ConfigError, OutputPathError
from kompakt.rundir.lineage import read_lineage
from kompakt.recipe.runner import GateError, run_recipe
from kompakt.recipe.schema import Recipe


def _recipe(tiny_dir, text_file, steps, **extra) -> Recipe:
    return Recipe.from_dict({"model": str(tiny_dir), "seed": 1, "data": small_data(text_file), "steps": steps, **extra})


def test_run_writes_steps_lineage_report_and_final(tiny_dir, text_file, tmp_path):
    seen = []
    recipe = _recipe(tiny_dir, text_file, [{"prune.depth": {"count": 1}}, {"prune.depth": {"count": 1, "method": "last"}}])
    result = run_recipe(recipe, tmp_path / "run", on_step=seen.append)
    out = tmp_path / "run"
    assert [r["index"] for r in seen] == [0, 1, 2] and seen[0]["pass"] == "original"
    records = read_lineage(out)
    assert [r["dir"] for r in records] == ["steps/01-prune.depth", "steps/02-prune.depth"]
    for record in records:
        assert {"pass", "config", "hash", "parameters", "bytes", "metrics", "wall_s", "summary"} <= set(record)
        assert record["config"]["method"] in ("block_influence", "last")
        assert {"ppl", "ppl_ratio", "kl_mean", "kl_p99", "top1"} <= set(record["metrics"])
    assert records[1]["parameters"] < records[0]["parameters"] < seen[0]["parameters"]
    assert os.readlink(out / "final") == "steps/02-prune.depth" and result.final == out / "final"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()) == recipe.validate()
    report = (out / "report.md").read_text()
    assert "| 2 | prune.depth |" in report and "final" in report
    assert not [p for p in (out / "steps").iterdir() if p.name.startswith(".")]


def test_rerun_skips_finished_steps_and_extends(tiny_dir, text_file, tmp_path, test_passes):
    CALLS.clear()
    steps = [{"test.noise": {"tag": "a"}}, {"prune.depth": {"count": 1, "method": "last"}}]
    run_recipe(_recipe(tiny_dir, text_file, steps), tmp_path / "run")
    assert CALLS == ["a"]
    first = read_lineage(tmp_path / "run")
    seen = []
    run_recipe(_recipe(tiny_dir, text_file, steps), tmp_path / "run", on_step=seen.append)
    assert CALLS == ["a"] and all(r["skipped"] for r in seen[1:])
    assert read_lineage(tmp_path / "run") == first
    longer = [*steps, {"test.noise": {"tag": "c"}}]
    run_recipe(_recipe(tiny_dir, text_file, longer), tmp_path / "run")
    assert CALLS == ["a", "c"] and len(read_lineage(tmp_path / "run")) == 3
    assert os.readlink(tmp_path / "run" / "final") == "steps/03-test.noise"


def test_other_recipe_in_same_dir_needs_force(tiny_dir, text_file, tmp_path, test_passes):
    run_recipe(_recipe(tiny_dir, text_file, [{"test.noise": {"tag": "a"}}]), tmp_path / "run")
    other = _recipe(tiny_dir, text_file, [{"test.noise": {"tag": "b"}}])
    with pytest.raises(OutputPathError, match="different recipe.*--force"):
        run_recipe(other, tmp_path / "run")
    reseeded = Recipe.from_dict({**_recipe(tiny_dir, text_file, [{"test.noise": {"tag": "a"}}]).to_dict(), "seed": 2})
    with pytest.raises(OutputPathError, match="different recipe"):
        run_recipe(reseeded, tmp_path / "run")
    run_recipe(other, tmp_path / "run", force=True)
    assert [r["config"]["tag"] for r in read_lineage(tmp_path / "run")] == ["b"]


def test_bad_out_dirs(tiny_dir, text_file, tmp_path):
    recipe = _recipe(tiny_dir, text_file, [{"prune.depth": {"count": 1, "method": "last"}}])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        run_recipe(recipe, tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="not a kompakt run directory"):
        run_recipe(recipe, tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_gate_stops_the_run_keeping_finished_steps(tiny_dir, text_file, tmp_path, test_passes):
    steps = [{"test.noise": {"scale": 0.0, "tag": "a"}}, {"test.noise": {"scale": 0.5, "tag": "b"}},
             {"test.noise": {"tag": "c"}}]  # fmt: skip
    recipe = _recipe(tiny_dir, text_file, steps, gates={"max_kl": 0.001})
    with pytest.raises(GateError, match="step 2 .*max_kl") as caught:
        run_recipe(recipe, tmp_path / "run")
    assert "\n" not in str(caught.value) and caught.value.exit_code == 3
    records = read_lineage(tmp_path / "run")
    assert [r["index"] for r in records] == [1, 2]
    assert os.readlink(tmp_path / "run" / "final") == "steps/01-test.noise"
    assert "Stopped by a gate" in (tmp_path / "run" / "report.md").read_text()
    # Loosening the gate continues from the finished steps.
    CALLS.clear()
    loose = _recipe(tiny_dir, text_file, steps, gates={"max_kl": 100.0})
    run_recipe(loose, tmp_path / "run")
    assert CALLS == ["c"] and len(read_lineage(tmp_path / "run")) == 3


def test_invalid_recipe_fails_before_loading_weights(tmp_path):
    recipe = Recipe.from_dict({"model": str(tmp_path / "does-not-exist"), "steps": [{"prune.depth": {"fraction": 2}}]})
    with pytest.raises(ConfigError, match="fraction must be in"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_ppl_only_metrics(tiny_dir, text_file, tmp_path):
    recipe = _recipe(tiny_dir, text_file, [{"prune.depth": {"count": 1, "method": "last"}}],
                     metrics=["ppl"], gates={"max_ppl_ratio": 1000.0})  # fmt: skip
    run_recipe(recipe, tmp_path / "run")
    (record,) = read_lineage(tmp_path / "run")
    assert set(record["metrics"]) == {"ppl", "ppl_reference", "ppl_ratio", "eval_tokens"}
    json.dumps(record)


def test_speed_metric_is_relative_to_the_original(tiny_dir, text_file, tmp_path):
    seen = []
    recipe = _recipe(tiny_dir, text_file, [{"prune.depth": {"count": 2, "method": "last"}}],
                     metrics=["ppl", "kl", "top1", "speed"])  # fmt: skip
    run_recipe(recipe, tmp_path / "run", on_step=seen.append)
    original = seen[0]["metrics"]
    assert {"prefill_tps", "generate_tps"} <= set(original)
    metrics = seen[1]["metrics"]
    assert metrics["prefill_speedup"] == pytest.approx(metrics["prefill_tps"] / original["prefill_tps"])
    assert metrics["generate_speedup"] == pytest.approx(metrics["generate_tps"] / original["generate_tps"])
    assert "prefill tok/s" in (tmp_path / "run" / "report.md").read_text()


def test_the_original_is_scored_once_and_shared_by_runs(tiny_dir, text_file, tmp_path, monkeypatch):
    """Steps are measured against the original's top-k distributions, computed by the first
    evaluation, kept in the reference directory and read back by later runs that share it (the
    attempts of compress --target); the KL equals fidelity_topk against the stored reference."""
    fidelity_module = importlib.import_module("kompakt.evaluate.fidelity")  # the package exports a function of that name
    from kompakt.evaluate.topk import TOP_K, TopK
    from kompakt.model.load import load
    from kompakt.recipe.rundata import RunData

    computed = []
    real = fidelity_module.reference_topk

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fidelity_module, "reference_topk", counting)
    shared = tmp_path / "reference"
    recipe = _recipe(tiny_dir, text_file, [{"prune.depth": {"count": 1}}, {"prune.depth": {"count": 1, "method": "last"}}])
    first = run_recipe(recipe, tmp_path / "a", reference_dir=shared)
    other = _recipe(tiny_dir, text_file, [{"prune.depth": {"count": 2, "method": "last"}}])
    run_recipe(other, tmp_path / "b", reference_dir=shared)
    assert len(computed) == 1 and len(list(shared.glob("*.safetensors"))) == 1
    stored = TopK.load(next(shared.glob("*.safetensors")))
    metrics = first.records[-1]["metrics"]
    assert metrics["kl_top_k"] == TOP_K and metrics["eval_tokens"] == len(stored)
    spec = recipe.validate().data
    ids = RunData(spec, load(str(tiny_dir)), recipe.seed).evaluation()
    direct = fidelity_module.fidelity_topk(stored, load(tmp_path / "a" / "final"), ids, window=spec.window,
                                           stride=spec.stride, max_tokens=spec.eval_tokens)  # fmt: skip
    assert metrics["kl_mean"] == pytest.approx(direct.kl_mean, rel=1e-6)
