"""distill.kd on tiny sentence encoders: every loss term trains, distillation brings a halved
student's embeddings closer to the teacher's, bad configurations are refused in one line."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.encode import embed
from kompakt.model.surgery import drop_layers
from kompakt.model.tiny_encoder import tiny_encoder
from kompakt.passes.base import PassContext, build_config, get_pass

SUBJECTS = ("the cat", "a farmer", "my neighbour", "the old bridge", "our team", "the river", "a small robot", "the city")
VERBS = ("watches", "builds", "crosses", "paints", "follows", "remembers", "hides", "carries")
OBJECTS = ("the morning train", "a red kite", "seven apples", "the quiet lake", "an open door", "two letters")


def corpus(n: int, offset: int = 0) -> list[str]:
    rows = [f"{s} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    return rows[offset : offset + n]


TRAIN, HELDOUT = corpus(240), corpus(48, offset=240)


def halved(family: str):
    """Teacher (4 layers) and a 2-layer student of other random weights (a tiny random teacher's
    own layers are nearly the identity on its mean-pooled embeddings: cosine 0.999 after
    dropping half of them, nothing to learn)."""
    teacher = tiny_encoder(family, seed=0)
    student, _ = drop_layers(tiny_encoder(family, seed=1), [1, 3])
    return teacher, student


def run_kd(teacher, student, **config):
    spec = get_pass("distill.kd")
    values = {"steps": 30, "batch_size": 16, "lr": 3e-3, "warmup": 0, "checkpoint_every": 0, **config}
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None, seed=0,
                      sentences=lambda source, n: (TRAIN, "test corpus"))  # fmt: skip
    return spec.apply(ctx, build_config(spec, values))


def mean_cosine(a, b, sentences) -> float:
    return float(torch.nn.functional.cosine_similarity(embed(a, sentences), embed(b, sentences)).mean())


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "modernbert"])
def test_distillation_brings_a_halved_student_closer_to_the_teacher(family):
    teacher, student = halved(family)
    before = mean_cosine(student, teacher, HELDOUT)
    report = run_kd(teacher, student, cosine_weight=1.0, hidden_weight=1.0)
    after = mean_cosine(report.loaded, teacher, HELDOUT)
    assert after > before + 0.5 * (1 - before), (family, before, after)
    assert report.details["sentences_seen"] == 30 * 16
    assert "cosine" in report.summary and "hidden" in report.summary


@pytest.mark.parametrize("terms", [
    {"cosine_weight": 0.0, "mse_weight": 1.0},
    {"cosine_weight": 0.0, "similarity_weight": 1.0},
    {"cosine_weight": 0.0, "neighbour_weight": 1.0, "steps": 40},  # a teacher cache is the bank
    {"cosine_weight": 0.0, "neighbour_weight": 1.0, "hidden_weight": 1.0},  # a sampled bank
    {"cosine_weight": 0.0, "attention_weight": 1.0},
    {"cosine_weight": 0.0, "relation_weight": 1.0},
])  # fmt: skip
def test_each_loss_term_alone_lowers_itself(terms):
    teacher, student = halved("bert")
    report = run_kd(teacher, student, **{"steps": 20, **terms})
    history = report.details
    assert history["loss_last"] < history["loss_first"], terms


def test_cached_teacher_embeddings_give_the_same_training_as_teacher_forwards(monkeypatch):
    """Sentence-level losses read the teacher's embeddings from a cache built once; the losses must
    equal those of a teacher forward per step (the cache is skipped when steps cover less than an
    epoch, so 40 steps of 16 over 240 sentences use it and 5 steps do not)."""
    from kompakt.train import encoder_objective

    teacher, student = halved("bert")
    built = []
    original = encoder_objective.teacher_embeddings

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder_objective, "teacher_embeddings", counting)
    cached = run_kd(teacher, copy.deepcopy(student), steps=40, similarity_weight=1.0)
    assert built == [1]
    short = run_kd(teacher, copy.deepcopy(student), steps=5, similarity_weight=1.0)
    assert built == [1]  # under an epoch: the teacher runs per step
    from kompakt.train.encoder_objective import EncoderDistillObjective
    from kompakt.train.sentence_batches import SentenceBatches

    batches = SentenceBatches(TRAIN, teacher.tokenizer, batch_size=16, max_length=64, seed=0)
    ids, mask = batches.batch(3)
    plain = EncoderDistillObjective(teacher.model, teacher.pooling, student.pooling, similarity_weight=1.0)
    with_cache = EncoderDistillObjective(teacher.model, teacher.pooling, student.pooling, similarity_weight=1.0,
                                         cache=original(teacher.model, teacher.pooling, batches.rows, batches.pad))  # fmt: skip
    with torch.no_grad():
        a, parts_a = plain(student.model, ids, mask)
        b, parts_b = with_cache(student.model, ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert parts_a.keys() == parts_b.keys() == {"cosine", "similarity"}
    assert cached.details["loss_last"] < cached.details["loss_first"] and short.details["steps"] == 5


def narrow_student(teacher):
    """A BERT student of half the width and heads, with the teacher's tokenizer."""
    from transformers import AutoModel

    config = copy.deepcopy(teacher.model.config)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 32, 64, 2
    config.num_hidden_layers = 2
    torch.manual_seed(1)
    model = AutoModel.from_config(config).eval()
    return type(teacher)(model=model, tokenizer=teacher.tokenizer, name="narrow", pooling=teacher.pooling)


def test_a_narrower_student_trains_through_a_projection_and_relation_heads():
    teacher = tiny_encoder("bert", seed=0)
    student = narrow_student(teacher)
    report = run_kd(teacher, student, steps=20, cosine_weight=0.0, hidden_weight=1.0, relation_weight=1.0,
                    relation_heads=4)  # fmt: skip
    assert report.details["loss_last"] < report.details["loss_first"]


def test_attention_kl_needs_equal_heads_and_relations_need_dividing_heads():
    teacher = tiny_encoder("bert", seed=0)
    student = narrow_student(teacher)
    with pytest.raises(ConfigError, match="relation_weight"):
        run_kd(teacher, student, attention_weight=1.0)
    with pytest.raises(ConfigError, match="relation_heads 3"):
        run_kd(teacher, student, relation_weight=1.0, relation_heads=3)


def test_the_relative_hidden_term_on_an_encoder_skips_padding():
    from kompakt.passes.encoder_training import _objective

    teacher, student = halved("bert")
    # BERT's layer outputs are layer-normed (mean square 1, where relative = raw MSE): lengthen the teacher's
    norm = dict(teacher.model.named_modules())["encoder.layer.3.output.LayerNorm"]
    with torch.no_grad():
        norm.weight.mul_(3.0)
    config = build_config(get_pass("distill.kd"), {"hidden_weight": 1.0, "hidden_loss": "relative",
                                                   "layer_map": [[2, 4]], "cosine_weight": 0.0})  # fmt: skip
    objective = _objective(config, teacher, student, "distill.kd")
    batch = student.tokenizer(["the cat", HELDOUT[0] + " " + HELDOUT[1]], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()  # the short sentence is padded
    _, parts = objective(student.model, ids, mask)
    with torch.no_grad():
        s = student.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        t = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[4]
    relative = (s - t).pow(2).mean(-1) / t.pow(2).mean(-1)
    assert parts["hidden"] == pytest.approx(float(relative[mask.bool()].mean()), rel=1e-5)


def test_all_weights_zero_is_refused():
    teacher, student = halved("bert")
    with pytest.raises(ConfigError, match="every encoder loss weight is 0"):
        run_kd(teacher, student, cosine_weight=0.0)


def test_a_neighbour_temperature_of_zero_is_refused():
    teacher, student = halved("bert")
    with pytest.raises(ConfigError, match="neighbour_temperature must be > 0"):
        run_kd(teacher, student, neighbour_weight=1.0, neighbour_temperature=0.0)


def test_a_decoder_teacher_for_an_encoder_is_refused():
    from kompakt.model.tiny import tiny_model

    _, student = halved("bert")
    with pytest.raises(ConfigError, match="not a sentence encoder"):
        run_kd(tiny_model(), student)


def test_encoder_fields_on_a_decoder_are_refused():
    from kompakt.model.tiny import tiny_model

    decoder = tiny_model()
    spec = get_pass("distill.kd")
    ctx = PassContext(loaded=decoder, original=lambda: decoder, calibration=lambda: None)
    with pytest.raises(ConfigError, match="relation_weight apply to sentence encoders only"):
        spec.apply(ctx, build_config(spec, {"steps": 1, "relation_weight": 1.0}))


def test_eval_every_scores_mean_cosine_on_held_out_sentences():
    teacher, student = halved("bert")
    report = run_kd(teacher, student, steps=10, eval_every=5)
    evals = report.details["evals"]
    assert [e["step"] for e in evals] == [0, 5, 10]
    assert evals[-1]["cosine"] > evals[0]["cosine"]


def test_sentences_budget_sets_the_steps():
    teacher, student = halved("bert")
    report = run_kd(teacher, student, steps=None, sentences=64, batch_size=16)
    assert report.details["steps"] == 4
