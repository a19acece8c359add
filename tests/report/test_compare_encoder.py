"""The encoder form of the LLM-vs-SLM table: measured on two tiny saved encoders (fresh-process
probes, fidelity measured when the run's metrics lack it), rendered in Markdown, HTML and the card."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kompakt.model.load import load
from kompakt.model.save import save_model
from kompakt.model.tiny import save_tiny_encoder
from kompakt.report.compare import compare, samples
from kompakt.report.document import comparison_rows
from kompakt.report.render import markdown, page

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(comparison, original, result): the result is the original with its last 2 of 4 layers cut."""
    root = tmp_path_factory.mktemp("cmp")
    save_tiny_encoder("bert", root / "original")
    original = load(root / "original")
    cut = copy.deepcopy(original)
    del cut.model.encoder.layer[2:]
    cut.model.config.num_hidden_layers = 2
    save_model(cut, root / "result")
    result = load(root / "result")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comparison = compare(original, result, root / "result", None, metrics={})
    finally:
        torch.set_num_threads(before)
    return comparison, original, result


def test_compare_dispatches_to_the_encoder_form_and_measures_everything(measured):
    comparison, original, result = measured
    values = comparison["values"]
    assert comparison["kind"] == "encoder" and comparison["k"] == 10
    assert values["parameters"][0] > values["parameters"][1]
    assert values["size_bytes"][0] > values["size_bytes"][1] > 0
    for key in ("peak_memory_bytes", "sentences_b1_per_s", "sentences_b32_per_s", "energy_j_per_1k"):
        assert all(v and v > 0 for v in values[key]), (key, comparison["notes"])
    assert values["cosine_mean"][0] == 1.0 and 0 < values["cosine_mean"][1] < 1
    assert 0 < values["recall_at_k"][1] < 1 and values["spearman"][1] < 1
    assert any("measured for this report" in note for note in comparison["notes"])
    json.dumps(comparison)  # comparison.json: JSON-able as it is
    assert samples(original, result) == []  # encoders do not generate


def test_the_run_metrics_are_used_when_they_hold_the_encoder_numbers(measured):
    from kompakt.report.compare_encoder import _fidelity

    _, original, result = measured
    metrics = {"cosine_mean": 0.97, "recall_at_k": 0.88, "k": 10, "spearman": 0.93, "pairs": 500}
    got, source = _fidelity(original, result, metrics)
    assert source == "the run's last evaluation" and (got["recall_at_k"], got["k"], got["spearman"]) == (0.88, 10, 0.93)
    step = {"cosine_mean": 0.96, "recall_at_10": 0.86, "spearman": 0.9, "eval_text": "wiki.test"}  # a recipe step's
    got, _ = _fidelity(original, result, step)
    assert (got["recall_at_k"], got["k"], got["data"]) == (0.86, 10, "wiki.test")
    measured_now, source = _fidelity(original, result, {"kl_mean": 0.1})  # a decoder's metrics: measure
    assert source == "measured for this report" and 0 < measured_now["recall_at_k"] < 1


def test_the_encoder_rows_render_in_markdown_html_and_are_labelled_for_sentences(measured):
    comparison, _, _ = measured
    labels = [row[0] for row in comparison_rows(comparison)]
    assert labels[4:9] == [
        "sentences/s, batch 1 (one query)", "sentences/s, batch 32 (indexing)",
        "cosine to the original's embeddings (mean)", "neighbour recall@10 vs the original",
        "Spearman of pair similarities vs the original",
    ]  # fmt: skip
    assert not any("token" in label or "KL" in label for label in labels)
    report = {"title": "t", "outcome": "o", "trajectory": [], "recipe_shown": "", "run_dir": "/r",
              "comparison": comparison}  # fmt: skip
    text = markdown(report)
    assert "neighbour recall@10" in text and "100.0%" in text and "perplexity" not in text
    assert "sentences/s, batch 32 (indexing)" in page(report, {})


def test_the_model_card_of_an_encoder_says_sentence_transformers(measured):
    import yaml

    from kompakt.report.card import model_card

    comparison, _, _ = measured
    report = {"plan": {"target": {"text": "params=0.5"}, "attempts": [{"steps": [{"prune.depth": {}}]}]},
              "outcomes": [{"attempt": 1, "status": "kept"}], "outcome": "o", "comparison": comparison,
              "recipe_yaml": "model: all-minilm-l6-v2\nsteps: []\n"}  # fmt: skip
    card = model_card(report, "sentence-transformers/all-MiniLM-L6-v2")
    front = yaml.safe_load(card.split("---")[1])
    assert (front["library_name"], front["pipeline_tag"]) == ("sentence-transformers", "sentence-similarity")
    assert "| neighbour recall@10 vs the original |" in card


def test_the_deployed_form_compares_onnx_files_in_onnxruntime(measured, tmp_path):
    """With the delivered int8 ONNX: both sides probed in onnxruntime (the original as its own fp32
    export), size the int8 file, fidelity the int8 graph's embeddings on the run's sentences."""
    from kompakt.auto.encoder_deliver import onnx_fidelity
    from kompakt.export import export
    from kompakt.model.encode import embed
    from kompakt.report.compare_encoder import OnnxDeployment, compare_encoder

    _, original, result = measured
    onnx = export(result, format="onnx", type="int8", out=tmp_path / "onnx-int8").path
    sentences = [f"Sentence number {i} is about {w}." for i, w in enumerate(["rain", "music", "bread", "chess"] * 6)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        deployed = OnnxDeployment(onnx, onnx_fidelity(onnx, sentences, "test sentences", embed(original, sentences)))
        comparison = compare_encoder(original, result, result.path, {"cosine_mean": 0.5}, deployed=deployed,
                                     timing=(sentences, "test sentences"))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    values, probes = comparison["values"], comparison["probes"]
    assert probes["original"]["backend"].startswith("onnxruntime") and probes["result"]["backend"].startswith("onnxruntime")
    assert values["size_bytes"][1] == (onnx / "model.onnx").stat().st_size
    assert all(v > 0 for v in values["sentences_b32_per_s"] + values["peak_memory_bytes"]), comparison["notes"]
    assert 0 < values["cosine_mean"][1] < 1 and values["cosine_mean"][1] != 0.5  # measured, not the run's
    assert any("int8 ONNX" in note for note in comparison["notes"])
    assert [p["distinct_sentences"] for p in probes.values()] == [24, 24]  # timed on the sentences given
    assert any("process per model, test sentences (64 one at a time" in note for note in comparison["notes"])


@pytest.mark.parametrize("after, words", [(457.4, "2.60x the original's (target 3x, not met within the floor)"),
                                          (540.0, "3.07x the original's (target 3x, met)")])  # fmt: skip
def test_the_outcome_states_an_encoder_speed_target_against_the_measured_speed(after, words):
    from kompakt.report.document import outcome_text

    plan = {"target": {"text": "speed=3x", "speed": 3.0}, "attempts": [{"label": "keep 5 of 6 layers"}]}
    values = {"size_bytes": (90.9e6, 21.0e6), "cosine_mean": (1.0, 0.965), "sentences_b32_per_s": (175.9, after)}
    report = {"plan": plan, "comparison": {"kind": "encoder", "values": values},
              "outcomes": [{"attempt": 1, "label": "keep 5 of 6 layers", "status": "within floor"}]}  # fmt: skip
    assert f"Speed at batch 32: {words}." in outcome_text(report)
