"""The runner's streamed mode (--max-memory below the model's size): same weights, no full load."""

from __future__ import annotations

import dataclasses

import pytest
from recipe_helpers import small_data

import kompakt
from kompakt.errors import ConfigError
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe
from kompakt.rundir.lineage import read_lineage

STEPS = [{"prune.sparse": {"method": "wanda", "sparsity": 0.5}}, {"quant.gptq": {"bits": 4, "group_size": 32}}]


def _recipe(tiny_dir, text_file, steps) -> Recipe:
    return Recipe.from_dict({"model": str(tiny_dir), "seed": 1, "data": small_data(text_file), "steps": steps,
                             "metrics": ["ppl"]})  # fmt: skip


def _weights(directory):
    return kompakt.load(directory, device="cpu", dtype="float32").model.state_dict()


def test_streamed_run_equals_in_memory_run(tiny_dir, text_file, tmp_path, one_thread, monkeypatch):
    from kompakt.model import load as load_module

    run_recipe(_recipe(tiny_dir, text_file, STEPS), tmp_path / "memory")
    loads = []
    real = load_module._load_weights
    monkeypatch.setattr(load_module, "_load_weights", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    result = run_recipe(_recipe(tiny_dir, text_file, STEPS), tmp_path / "streamed", max_memory="1KB")
    assert loads == []  # no step, not even the original, was loaded whole
    records = read_lineage(tmp_path / "streamed")
    assert [r["details"].get("streamed") for r in records] == [True, True]
    assert [r["details"]["activations"] for r in records] == ["disk", "disk"]  # 1 KB holds no layer
    assert all(r["metrics"] == {} and r["parameters"] > 0 for r in records)
    monkeypatch.undo()
    memory, streamed = _weights(tmp_path / "memory" / "final"), _weights(result.final)
    assert sorted(memory) == sorted(streamed)
    assert all(memory[k].equal(streamed[k]) for k in memory)
    seen = []  # a rerun resumes: every step is skipped
    run_recipe(_recipe(tiny_dir, text_file, STEPS), tmp_path / "streamed", max_memory="1KB", on_step=seen.append)
    assert all(r["skipped"] for r in seen[1:])


def test_large_budget_runs_in_memory(tiny_dir, text_file, tmp_path):
    run_recipe(_recipe(tiny_dir, text_file, STEPS[:1]), tmp_path / "run", max_memory="64GB")
    record = read_lineage(tmp_path / "run")[0]
    assert "streamed" not in record["details"] and "ppl" in record["metrics"]


def test_streamed_run_refuses_what_needs_the_whole_model(tiny_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="distill.kd needs the whole model in memory .*accelerate launch"):
        run_recipe(_recipe(tiny_dir, text_file, [{"distill.kd": {}}]), tmp_path / "run", max_memory="1KB")
    assert not (tmp_path / "run").exists()


def test_step_after_a_packed_step_streams_from_it(tiny_dir, text_file, tmp_path, one_thread):
    steps = STEPS[::-1]  # quantized (stored packed), then pruned: the second step opens the packed step lazily
    run_recipe(_recipe(tiny_dir, text_file, steps), tmp_path / "memory")
    result = run_recipe(_recipe(tiny_dir, text_file, steps), tmp_path / "streamed", max_memory="1KB")
    memory, streamed = _weights(tmp_path / "memory" / "final"), _weights(result.final)
    assert sorted(memory) == sorted(streamed) and all(memory[k].equal(streamed[k]) for k in memory)


def test_streamed_run_needs_calibration_text(tiny_dir, tmp_path):
    recipe = Recipe.from_dict({"model": str(tiny_dir), "steps": STEPS[1:]})
    with pytest.raises(ConfigError, match="pass calibration text with --data"):
        run_recipe(recipe, tmp_path / "run", max_memory="1KB")
    assert not (tmp_path / "run").exists()


def test_streamed_magnitude_pruning_needs_no_calibration_text(tiny_dir, text_file, tmp_path, one_thread):
    """Only steps whose settings read data ask for --data: magnitude pruning streams without it and
    gives the weights a run with data gives."""
    steps = [{"prune.sparse": {"method": "magnitude", "sparsity": 0.5}}]
    run_recipe(_recipe(tiny_dir, text_file, steps), tmp_path / "memory")
    result = run_recipe(Recipe.from_dict({"model": str(tiny_dir), "seed": 1, "steps": steps}), tmp_path / "streamed",
                        max_memory="1KB")  # fmt: skip
    assert read_lineage(tmp_path / "streamed")[0]["details"]["streamed"] is True
    memory, streamed = _weights(tmp_path / "memory" / "final"), _weights(result.final)
    assert sorted(memory) == sorted(streamed) and all(memory[k].equal(streamed[k]) for k in memory)


def test_only_steps_that_read_data_hash_it(tiny_dir, text_file):
    """A step's identity includes the calibration data only where its settings read it: other data
    changes a Wanda step's hash, not a magnitude step's (a rerun with new data keeps it)."""
    from kompakt.recipe.rundata import RunData
    from kompakt.recipe.runner import _plan

    def hashes(method: str, blocks: int) -> str:
        recipe = _recipe(tiny_dir, text_file, [{"prune.sparse": {"method": method, "sparsity": 0.5}}])
        spec = dataclasses.replace(recipe.data, calibration_blocks=blocks)
        return _plan(recipe, "model", RunData(spec, kompakt.load(tiny_dir), 1))[0].hash

    assert hashes("magnitude", 4) == hashes("magnitude", 8)
    assert hashes("wanda", 4) != hashes("wanda", 8)


def test_cli_max_memory_streams_and_refuses_in_one_line(tiny_dir, text_file, tmp_path, cli, one_thread):
    base = ["compress", str(tiny_dir), "--data", str(text_file), "--out", str(tmp_path / "run")]
    code, out, err = cli([*base, "--step", "quant.rtn:bits=4,group_size=32", "--max-memory", "1KB"])
    assert code == 0, err
    assert read_lineage(tmp_path / "run")[0]["details"]["streamed"] is True
    code, _, err = cli([*base, "--step", "finetune.lora", "--max-memory", "1KB", "--force"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "finetune.lora needs the whole model" in err
    code, _, err = cli([*base, "--step", "quant.rtn", "--max-memory", "lots"])
    assert code == 2 and "size like 6GB" in err
    code, _, err = cli(["compress", str(tiny_dir), "--max-memory", "1GB"])
    assert code == 2 and "--max-memory streams --recipe / --step runs" in err
