"""Shared artifacts name a model by its hub id or name and data by file name and sha256: the GGUF
metadata and the model card hold no local path (tmp directory, home directory, cache, run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kompakt.export.gguf import export_gguf
from kompakt.export.manifest import sha256_file
from kompakt.export.public import display_name, public_data, public_model_name, public_recipe_yaml, scrub_paths
from kompakt.model.load import load
from kompakt.model.tiny import save_tiny, tiny_model

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "tiny-llama"
    save_tiny("llama", directory)
    return directory


def _fake_step(run: Path, model: str | None, index: int = 1) -> Path:
    """A run directory as the recipe runner leaves it: recipe.yaml, steps/NN-pass/ with its marker, final."""
    step = run / "steps" / f"{index:02d}-quant.rtn"
    step.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": model, "steps": [{"quant.rtn": {"bits": 8}}]}))
    (step / "kompakt-step.json").write_text("{}")
    (step / "config.json").write_text("{}")
    (run / "final").symlink_to(step.relative_to(run))
    return step


def test_embedded_and_hub_names(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--google--gemma-3-270m").mkdir(parents=True)
    assert public_model_name(None) == SMOLLM2
    assert public_model_name("smollm2-135m") == SMOLLM2 and public_model_name("SmolLM2-135M") == SMOLLM2
    assert public_model_name("google/gemma-3-270m") == "google/gemma-3-270m"  # the hub cache holds it
    assert display_name(SMOLLM2) == "SmolLM2-135M-Instruct"
    assert public_model_name(tiny_model("llama")) == "tiny-llama"


def test_a_path_the_user_gave_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`runs/x` has a hub id's shape: as given, only its last part is public, local or not."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert public_model_name("runs/x") == "x" and public_model_name("someone/private-model") == "private-model"
    save_tiny("llama", tmp_path / "runs" / "x")
    assert public_model_name("runs/x") == "x"
    named = tmp_path / "named"  # a config that records a relative path, not a hub id
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "runs/x"}))
    assert public_model_name(named) == "named"


@pytest.mark.parametrize(
    "text, public",
    [
        ("cannot load /home/John Smith/x.gguf (no such file)", "cannot load x.gguf (no such file)"),
        ("cannot write /home/John Smith (permission denied)", "cannot write ~ (permission denied)"),
        ("error: '/srv/my data/my model.gguf' is missing", "error: 'my model.gguf' is missing"),
        ("in /Users/Jane Doe/Library/m: bad", "in m: bad"),
        ("see /tmp/a and /tmp/b", "see a and b"),
        ("https://huggingface.co/org/model, ./rel/x and 1/2", "https://huggingface.co/org/model, ./rel/x and 1/2"),
    ],
)
def test_scrub_paths_leaves_no_directory_and_no_user_name(text, public):
    assert scrub_paths(text) == public


def test_scrub_paths_hides_this_users_home_even_with_odd_characters(monkeypatch):
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: Path("/data/people/Ann Lee (guest)")))
    assert scrub_paths("wrote /data/people/Ann Lee (guest)/out/m.gguf") == "wrote m.gguf"


def test_run_steps_are_named_after_the_model_their_lineage_started_from(tiny_dir, tmp_path):
    first = tmp_path / "runs" / "first"
    _fake_step(first, str(tiny_dir))
    assert public_model_name(first / "final") == "tiny-llama"
    assert public_model_name(str(first / "steps" / "01-quant.rtn")) == "tiny-llama"
    second = tmp_path / "runs" / "second"  # a run that started from the first run's result
    _fake_step(second, str(first / "final"))
    assert public_model_name(second / "final") == "tiny-llama"
    embedded = tmp_path / "runs" / "embedded"
    _fake_step(embedded, None)
    assert public_model_name(embedded / "final") == SMOLLM2


def test_compress_target_export_and_generic_directories(tiny_dir, tmp_path):
    out = tmp_path / "auto"
    (out / "export" / "hf").mkdir(parents=True)
    (out / "auto.json").write_text(json.dumps({"model": str(tiny_dir)}))
    assert public_model_name(out / "export" / "hf") == "tiny-llama"
    plain = tmp_path / "mymodel" / "hf"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text("{}")
    assert public_model_name(plain) == "mymodel"  # never "hf"
    named = tmp_path / "hf"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "org/some-model"}))
    assert public_model_name(named) == "org/some-model"
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert public_model_name(snapshot) == "org/cached"


def test_data_is_named_by_file_name_and_sha256(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some calibration text\n")
    assert public_data(text) == {"file": "corpus.txt", "sha256": sha256_file(text)}
    assert public_data("elsewhere/notes.txt") == {"file": "notes.txt"}
    recipe = yaml.safe_dump({"model": None, "data": {"calibration": str(text), "evaluation": None},
                             "steps": [{"distill.kd": {"data": str(text), "teacher": "smollm2-135m"}}]})  # fmt: skip
    public = public_recipe_yaml(recipe)
    assert str(tmp_path) not in public
    values = yaml.safe_load(public)
    assert values["model"] == SMOLLM2 and values["data"]["calibration"]["file"] == "corpus.txt"
    assert values["steps"][0]["distill.kd"]["data"]["sha256"] == sha256_file(text)


def _metadata_strings(path: Path) -> dict[str, str]:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    return {name: str(field.contents()) for name, field in reader.fields.items()
            if field.types and field.types[0] == GGUFValueType.STRING}  # fmt: skip


def test_gguf_metadata_holds_no_local_path(tiny_dir, tmp_path):
    run = tmp_path / "runs" / "r"
    step = _fake_step(run, str(tiny_dir))
    save_tiny("llama", step)  # the step's model (the marker stays)
    path = export_gguf(load(run / "final", device="cpu"), tmp_path / "out.gguf", type="f16")
    strings = _metadata_strings(path)
    assert strings["general.name"] == "tiny-llama" and strings["kompakt.source"] == "tiny-llama"
    for value in strings.values():
        assert str(tmp_path) not in value and str(Path.home()) not in value


def test_model_card_holds_no_local_path(tiny_dir, tmp_path):
    from kompakt.report.card import model_card

    text = tmp_path / "corpus.txt"
    text.write_text("calibration text\n")
    recipe = yaml.safe_dump({"model": str(tiny_dir), "data": {"calibration": str(text)},
                             "steps": [{"quant.rtn": {"bits": 8}}]})  # fmt: skip
    report = {"plan": {"target": {"text": "size=2x"}, "attempts": [{"steps": [{"quant.rtn": {}}]}]},
              "outcomes": [{"attempt": 1, "status": "within floor"}], "outcome": "Target met.",
              "comparison": {"values": {}, "notes": [f"result speed not measured: cannot load {tmp_path}/x.gguf"]},
              "exports": {"gguf": str(tmp_path / "model.gguf"), "gguf_check": "passed: llama.cpp, top-1 99%"},
              "recipe_yaml": recipe}  # fmt: skip
    card = model_card(report, str(tiny_dir))
    assert "## Checked after export" in card and "- gguf: passed: llama.cpp" in card
    assert str(tmp_path) not in card and str(Path.home()) not in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-llama"
    assert "corpus.txt" in card and sha256_file(text) in card


def test_model_card_recipe_says_what_null_meant():
    from kompakt.report.card import model_card

    data = {"calibration": None, "calibration_blocks": 8, "block_len": 64}
    recipe = yaml.safe_dump({"model": None, "seed": 3, "data": data, "steps": [{"quant.rtn": {}}]})
    report = {"plan": {"target": {"text": "size=2x"}, "attempts": [{"steps": [{"quant.rtn": {}}]}]},
              "outcomes": [{"attempt": 1, "status": "within floor"}], "outcome": "Target met.", "recipe_yaml": recipe}
    card = model_card(report, None)
    assert "calibration: null  # self-generated by the original model, seed 3, 8 blocks of 64 tokens" in card
    assert f"model: {SMOLLM2}" in card  # the public recipe names the embedded default: no null left to explain
