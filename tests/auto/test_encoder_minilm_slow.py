"""On the embedded all-MiniLM-L6-v2: the headline `--target params=0.5` without --data is refused
in one line with the reachable minimum (nothing written), with --data it is planned with the
vocabulary trimmed to that text; the plan for a reachable target, and a few
distillation steps of the halved model raising its cosine to the teacher."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

pytestmark = pytest.mark.slow


def test_params_half_is_refused_with_the_reachable_minimum(cli, tmp_path):
    code, out, err = cli(["compress", "all-minilm-l6-v2", "--target", "params=0.5", "--out", str(tmp_path / "enc")])
    assert code == 2, (out, err)
    assert "smallest reachable by layers is params=0.61" in err and "DistilBERT is params=0.77" in err
    assert "pass it as --data" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "enc").exists()


def test_params_half_with_data_plans_a_vocabulary_trim(cli, tmp_path):
    words = "river bread music garden window teacher morning city market winter letter station".split()
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(f"The {a} and the {b} were near the {c}." for a, b, c in itertools.product(words, repeat=3)))
    code, out, err = cli(["compress", "all-minilm-l6-v2", "--target", "params=0.5", "--data", str(data),
                           "--plan-only", "--out", str(tmp_path / "enc")])  # fmt: skip
    assert code == 0, err
    assert "keep 5 of 6 layers and trim the vocabulary" in out and "prune.vocab" in out  # a small vocabulary leaves room


def test_plan_only_for_a_reachable_target(cli, tmp_path):
    code, out, err = cli(["compress", "all-minilm-l6-v2", "--target", "params=0.8", "--plan-only",
                           "--out", str(tmp_path / "enc")])  # fmt: skip
    assert code == 0, err
    assert "keep 3 of 6 layers = 76.6%" in out and "angular" in out and "distill.kd" in out


SUBJECTS = ("A young boy", "The old woman", "A small dog", "Two students", "The chef", "A musician", "The pilot", "A farmer")
ACTIONS = ("is reading a book", "plays the guitar", "walks along the beach", "cooks dinner", "rides a bicycle",
           "paints a fence", "waits for the bus", "feeds the birds")  # fmt: skip
PLACES = ("in the park.", "at home.", "near the river.", "in the city.")


def test_distillation_raises_the_halved_models_cosine():
    from kompakt.model.encode import embed
    from kompakt.model.load import load
    from kompakt.model.surgery import drop_layers
    from kompakt.passes.base import PassContext, build_config, get_pass

    sentences = [f"{s} {a} {p}" for s, a, p in itertools.product(SUBJECTS, ACTIONS, PLACES)]
    train, heldout = sentences[::2], sentences[1::2][:64]
    teacher = load("all-minilm-l6-v2")
    student, _ = drop_layers(copy.deepcopy(teacher), [1, 3, 5])
    reference = embed(teacher, heldout)

    def cosine(model) -> float:
        return float(torch.nn.functional.cosine_similarity(embed(model, heldout), reference).mean())

    before = cosine(student)
    spec = get_pass("distill.kd")
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None,
                      sentences=lambda source, n: (train, "test sentences"))  # fmt: skip
    report = spec.apply(ctx, build_config(spec, {"steps": 8, "batch_size": 16, "lr": 5e-4, "warmup": 0,
                                                "checkpoint_every": 0}))  # fmt: skip
    after = cosine(report.loaded)
    assert after > before + 0.05, (before, after)
