"""A recipe on a tiny sentence encoder: steps are scored by embedding fidelity (cosine, recall@10,
Spearman against the original on held-out sentences), distillation heals a depth cut, and the
trajectory shows the encoder columns."""

from __future__ import annotations

import itertools

import pytest

from kompakt.model.load import load
from kompakt.model.tiny_encoder import save_tiny_encoder
from kompakt.recipe.runner import GateError, run_recipe
from kompakt.recipe.schema import DataSpec, Gates, Recipe, Step

WORDS = (("the cat", "a farmer", "my neighbour", "the old bridge", "our team", "the river", "a robot", "the city"),
         ("watches", "builds", "crosses", "paints", "follows", "remembers", "hides", "carries"),
         ("the morning train", "a red kite", "seven apples", "the quiet lake", "an open door", "two letters"))  # fmt: skip


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("enc") / "bert"
    save_tiny_encoder("bert", directory)
    return directory


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    rows = [f"{s.capitalize()} {v} {o}." for s, v, o in itertools.product(*WORDS)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _recipe(model, data, steps, gates=None) -> Recipe:
    return Recipe(model=str(model), data=DataSpec(calibration=str(data)), metrics=["cosine"], steps=steps,
                  gates=gates or Gates())  # fmt: skip


def test_encoder_steps_are_scored_by_embedding_fidelity_and_kd_heals(encoder_dir, sentences_file, tmp_path):
    steps = [Step("prune.depth", {"count": 3, "method": "last"}),
             Step("distill.kd", {"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup": 0, "hidden_weight": 1.0})]  # fmt: skip
    result = run_recipe(_recipe(encoder_dir, sentences_file, steps), tmp_path / "run")
    pruned, healed = (r["metrics"] for r in result.records)
    assert pruned["eval_sentences"] == 38  # the held-out last 10 % of 384 sentences
    for metrics in (pruned, healed):
        assert -1 <= metrics["cosine_mean"] <= 1 and 0 <= metrics["recall_at_10"] <= 1
    assert 1 - healed["cosine_mean"] < 0.5 * (1 - pruned["cosine_mean"])
    final = load(result.final)
    assert final.is_encoder and final.model.config.num_hidden_layers == 1
    report = (result.out_dir / "report.md").read_text()
    assert "cosine" in report and "recall@10" in report


def test_min_cosine_gate_stops_the_run(encoder_dir, sentences_file, tmp_path):
    steps = [Step("prune.depth", {"count": 3, "method": "last"})]
    recipe = _recipe(encoder_dir, sentences_file, steps, Gates(min_cosine=0.99999))
    with pytest.raises(GateError, match="min_cosine: cosine_mean"):
        run_recipe(recipe, tmp_path / "run")


def test_without_data_steps_are_scored_on_the_shipped_held_out_sentences():
    from kompakt.evaluate.sentences import DEFAULT_LABEL
    from kompakt.model.tiny_encoder import tiny_encoder
    from kompakt.recipe.rundata import EVAL_SENTENCES, RunData

    sentences, where = RunData(DataSpec(), tiny_encoder("bert"), 0).eval_sentences()
    assert where == DEFAULT_LABEL and 20 <= len(sentences) <= EVAL_SENTENCES


def test_run_data_holds_the_evaluation_end_out_of_training(sentences_file):
    from kompakt.model.tiny_encoder import tiny_encoder
    from kompakt.recipe.rundata import RunData

    data = RunData(DataSpec(calibration=str(sentences_file)), tiny_encoder("bert"), 0)
    train, _ = data.sentences(None, 100)
    held, _ = data.eval_sentences()
    assert len(train) + len(held) == 384 and not set(train) & set(held)


def test_every_step_keeps_the_models_sentence_transformers_files(sentences_file, tmp_path):
    """max_seq_length (32 here, below the 128-position table and the tokenizer's 128) and the
    Normalize module travel from the original's sentence_bert_config.json / modules.json through
    a depth cut, distillation and a vocabulary trim: a step never re-derives them."""
    import dataclasses
    import json

    from kompakt.model.save import save_model
    from kompakt.model.tiny_encoder import tiny_encoder

    original = tiny_encoder("bert")
    original.pooling = dataclasses.replace(original.pooling, max_seq_length=32)
    save_model(original, tmp_path / "bert")
    steps = [Step("prune.depth", {"count": 2, "method": "last"}), Step("distill.kd", {"steps": 2, "batch_size": 8}),
             Step("prune.vocab", {})]  # fmt: skip
    result = run_recipe(_recipe(tmp_path / "bert", sentences_file, steps), tmp_path / "run")
    for record in result.records:
        step_dir = result.out_dir / record["dir"]
        assert json.loads((step_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 32, record["dir"]
        modules = json.loads((step_dir / "modules.json").read_text())
        assert any(m["type"].endswith("Normalize") for m in modules), record["dir"]
        assert load(step_dir).pooling == original.pooling


@pytest.mark.slow
def test_a_minilm_step_keeps_max_seq_length_256(sentences_file, tmp_path):
    """all-MiniLM-L6-v2 declares 256 tokens (its position table and tokenizer say 512): a step's
    directory says 256 too and embeds as SentenceTransformer would load it, normalised."""
    import json

    steps = [Step("prune.depth", {"count": 3, "method": "last"})]
    result = run_recipe(_recipe("all-minilm-l6-v2", sentences_file, steps), tmp_path / "run")
    step_dir = result.out_dir / result.records[-1]["dir"]
    assert json.loads((step_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    pruned = load(step_dir)
    assert pruned.pooling.max_seq_length == 256 and pruned.pooling.normalize and pruned.pooling.mode == "mean"


def test_a_budget_smaller_than_the_encoder_runs_it_in_memory(encoder_dir, sentences_file, tmp_path):
    """Only causal LMs stream: --max-memory below an encoder's size runs it whole (it is small), and
    opening it layer by layer is a one-line error instead of a half-built causal-LM skeleton."""
    from kompakt.model.lazy import open_lazy
    from kompakt.model.lazy_index import NotLazyError

    steps = [Step("prune.depth", {"count": 1, "method": "last"})]
    result = run_recipe(_recipe(encoder_dir, sentences_file, steps), tmp_path / "run", max_memory="1KB")
    assert load(result.final).model.config.num_hidden_layers == 3
    with pytest.raises(NotLazyError, match="sentence encoder"):
        open_lazy(encoder_dir)
