"""CLI: `kompakt compress`, `passes list/show`, `recipe validate` — end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kompakt.model.tiny import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipe"))
from recipe_helpers import write_text  # noqa: E402


def kompakt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kompakt", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny("qwen2", root / "model")
    return root / "model", write_text(root / "calib.txt")


def test_passes_list_and_show(cli):
    listed = kompakt("passes", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith("prune.depth ") for line in listed.stdout.splitlines())
    code, shown, err = cli(["passes", "show", "prune.depth"])
    assert code == 0, err
    for needle in ("fraction", "block_influence", "- prune.depth: {", "--step prune.depth:"):
        assert needle in shown


def test_compress_with_steps_then_resume(tiny, tmp_path, cli):
    model, text = tiny
    out = tmp_path / "run"
    args = ("compress", str(model), "--step", "prune.depth:count=1,method=last", "--step", "prune.depth:fraction=0.25",
            "--data", str(text), "--out", str(out))  # fmt: skip
    done = kompakt(*args)
    assert done.returncode == 0, done.stderr
    assert "prune.depth" in done.stdout and "final" in done.stdout
    lines = (out / "lineage.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [1, 2]
    assert json.loads((out / "final" / "config.json").read_text())["num_hidden_layers"] == 2
    again = kompakt(*args)
    assert again.returncode == 0, again.stderr
    assert (out / "lineage.jsonl").read_text().splitlines() == lines
    other = ("compress", str(model), "--step", "prune.depth:count=2,method=last", "--data", str(text), "--out", str(out))
    code, _, err = cli(list(other))
    assert code == 2 and "--force" in err
    code, _, err = cli([*other, "--force"])
    assert code == 0, err
    assert len((out / "lineage.jsonl").read_text().splitlines()) == 1


def test_compress_with_recipe(tiny, tmp_path, cli):
    model, text = tiny
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {model}\ndata: {{calibration: {text}, calibration_blocks: 8, block_len: 64, eval_tokens: 512,"
        " window: 128, stride: 128}\nsteps:\n  - prune.depth: {count: 1, method: angular}\n"
    )
    code, shown, _ = cli(["recipe", "validate", str(recipe)])
    assert code == 0 and "ok (1 step(s): prune.depth)" in shown
    code, _, err = cli(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert code == 0, err
    assert (tmp_path / "run" / "report.md").exists()


BAD_RECIPES = {
    "unknown_pass": ("steps:\n  - prune.nothing: {}\n", "unknown pass 'prune.nothing'"),
    "unknown_field": ("steps:\n  - prune.depth: {layers: 3}\n", "unknown field(s) layers"),
    "unknown_top_key": ("modell: x\nsteps:\n  - prune.depth: {count: 1}\n", "unknown key(s) modell"),
    "gate_not_computed": ("metrics: [ppl]\ngates: {max_kl: 0.1}\nsteps:\n  - prune.depth: {count: 1}\n", "needs metric 'kl'"),
    "fraction_range": ("steps:\n  - prune.depth: {fraction: 1.2}\n", "fraction must be in (0, 1)"),
    "sparsity_range": ("steps:\n  - prune.sparse: {sparsity: 1.0}\n", "sparsity must be in [0, 1)"),
}
BAD_STEPS = [
    (("--step", "prune.depth:fraction=1.5"), "fraction must be in (0, 1)"),
    (("--step", "prune.sparse:method=wanda,sparsity=-0.1"), "sparsity must be in [0, 1)"),
    (("--step", "prune.nothing:x=1"), "unknown pass"),
    (("--step", "prune.depth:fraction"), "is not key=value"),
    (("--step", "prune.depth:count=1", "--recipe", "x.yaml"), "either --recipe or --step"),
    (("--step", "prune.depth:count=1", "--target", "size=2x"), "drop --recipe and --step"),
]


def _one_line(stderr: str, needle: str) -> None:
    assert needle in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_line(case, tmp_path, cli):
    text, needle = BAD_RECIPES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    for args in (("recipe", "validate", str(recipe)), ("compress", "--recipe", str(recipe), "--out", str(tmp_path / "run"))):
        code, _, err = cli([*args])
        assert code == 2
        _one_line(err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "needle"), BAD_STEPS)
def test_bad_step_exits_2_with_one_line(args, needle, tmp_path, cli):
    code, _, err = cli(["compress", "/nonexistent/model", *args, "--out", str(tmp_path / "run")])
    assert code == 2
    _one_line(err, needle)


def test_bad_input_in_a_real_process(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_RECIPES["gate_not_computed"][0])
    done = kompakt("recipe", "validate", str(recipe))
    assert done.returncode == 2
    _one_line(done.stderr, "needs metric 'kl'")
    done = kompakt("compress", "/nonexistent/model", "--step", "prune.depth:fraction=1.5", "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    _one_line(done.stderr, "fraction must be in (0, 1)")


def test_gate_stop_exits_3_with_one_line(tiny, tmp_path, cli):
    model, text = tiny
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(
        f"model: {model}\ndata: {{calibration: {text}, calibration_blocks: 4, block_len: 64, eval_tokens: 512,"
        " window: 128, stride: 128}\ngates: {max_kl: 0.0}\nsteps:\n  - prune.depth: {count: 1, method: last}\n"
    )
    code, _, err = cli(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert code == 3
    _one_line(err, "crossed gate max_kl")
    assert (tmp_path / "run" / "lineage.jsonl").exists() and not (tmp_path / "run" / "final").exists()


def test_an_encoder_run_prints_its_onnx_export_or_why_there_is_none():
    from rich.console import Console

    from kompakt.cli.compress import _print_exports

    console = Console(record=True, width=200)
    _print_exports(console, {"onnx": "runs/enc/export/onnx-int8", "onnx_type": "int8", "onnx_check": "passed: cosine 0.99"})
    _print_exports(console, {"onnx_note": "no ONNX export: --format onnx needs onnxruntime: pip install 'kompakt[encoders]'"})
    printed = console.export_text()
    assert "export (ONNX int8): runs/enc/export/onnx-int8" in printed and "check: passed: cosine 0.99" in printed
    assert "no ONNX export: --format onnx needs onnxruntime" in printed and "exports: none" not in printed
