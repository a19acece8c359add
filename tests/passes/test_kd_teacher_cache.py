"""distill.kd with teacher_cache: the teacher's top-k logits of every training batch are computed
before training and read from disk while the student trains. Same weights as top-k KD computed
on the fly; the teacher never runs during training; a teacher opened lazily (larger than memory)
is run layer by layer and gives the in-memory teacher's fp32 values; bad configurations are one line."""

from __future__ import annotations

import random

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.lazy import open_lazy
from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import save_tiny, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.train.data import SequenceBatches
from kompakt.train.sources import training_tokens
from kompakt.train.teacher_cache import build_teacher_cache, rank_positions

pytestmark = pytest.mark.usefixtures("one_thread")
KD = {"alpha": 0.7, "temperature": 2.0, "top_k": 8, "steps": 4, "seq_len": 32, "batch_size": 2, "lr": 1e-3,
      "checkpoint_every": 0, "eval_every": 0}  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)) + "\n")
    return path


def _distill(student: LoadedModel, teacher: LoadedModel, work, **values) -> dict:
    spec = get_pass("distill.kd")
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None, seed=0, work_dir=work)
    return spec.apply(ctx, build_config(spec, values)).details


def _student() -> LoadedModel:
    return tiny_model("llama", seed=1, num_hidden_layers=1)


def _forward_count(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_top_k_trains_the_weights_of_top_k_on_the_fly(text, tmp_path):
    teacher = tiny_model("llama", seed=0)
    live, cached = _student(), _student()
    _distill(live, teacher, tmp_path / "live", data=str(text), **KD)
    calls = _forward_count(teacher.model)
    details = _distill(cached, teacher, tmp_path / "cached", data=str(text), teacher_cache=True, **KD)
    assert details["teacher_cache"] is True
    assert calls[0] == KD["steps"]  # once per batch, before training; none while the student trains
    for (name, a), b in zip(live.model.state_dict().items(), cached.model.state_dict().values()):
        assert torch.equal(a, b), name
    again = _student()  # a rerun finds every batch cached (a killed step keeps its work folder)
    _distill(again, teacher, tmp_path / "cached", data=str(text), teacher_cache=True, **KD)
    assert calls[0] == KD["steps"]
    assert all(torch.equal(a, b) for a, b in zip(cached.model.state_dict().values(), again.model.state_dict().values()))


def test_a_lazily_opened_teacher_is_cached_layer_by_layer_with_the_same_values(text, tmp_path):
    teacher = save_tiny("llama", tmp_path / "teacher")
    lazy = open_lazy(tmp_path / "teacher").loaded()
    data = training_tokens(str(text), teacher, 2000)
    batches = SequenceBatches(data, seq_len=32, batch_size=2, seed=0)
    positions = rank_positions(5)
    streamed = build_teacher_cache(lazy, batches, positions, 8, tmp_path / "streamed")  # fp32, layer by layer
    for position in positions:
        ids = batches.batch(position)[0]
        with torch.no_grad():
            expected = teacher.model(input_ids=ids, use_cache=False).logits[:, :-1].topk(8)
        got = streamed.lookup(ids)
        assert torch.equal(got.indices, expected.indices) and torch.allclose(got.values, expected.values, atol=1e-5)
    student = _student()  # and the pass trains from the lazy teacher without running it whole
    details = _distill(student, lazy, tmp_path / "work", data=str(text), teacher_cache=True,
                       **{**KD, "eval_every": 2})  # fmt: skip
    assert details["teacher_cache"] is True
    evals = details["evals"]  # against the reference computed once, layer by layer
    assert len(evals) >= 2 and all({"kl", "ppl", "top1"} <= set(row) and row["kl"] >= 0 for row in evals)


def test_bad_configurations_are_one_line(text, tmp_path):
    spec = get_pass("distill.kd")
    with pytest.raises(ConfigError, match="teacher_cache keeps the teacher's top_k logits only: set top_k"):
        build_config(spec, {"teacher_cache": True})
    with pytest.raises(ConfigError, match="leave hidden_weight at 0"):
        build_config(spec, {"teacher_cache": True, "top_k": 8, "hidden_weight": 1.0})
    save_tiny("llama", tmp_path / "teacher")
    lazy = open_lazy(tmp_path / "teacher").loaded()
    with pytest.raises(ConfigError, match="does not fit --max-memory beside the student; set teacher_cache: true"):
        _distill(_student(), lazy, tmp_path / "work", data=str(text), **{**KD, "top_k": None})


def test_a_recipe_teacher_larger_than_max_memory_is_streamed_into_the_cache(text, tmp_path):
    """`teacher: PATH` over --max-memory beside a student that fits: the runner opens the teacher
    lazily, distill.kd computes its cache layer by layer and trains the student in memory."""
    from kompakt.calib.memory_plan import PROCESS_BYTES
    from kompakt.recipe.runner import run_recipe
    from kompakt.recipe.schema import Recipe
    from kompakt.recipe.stream_step import in_memory_bytes
    from kompakt.rundir.lineage import read_lineage

    student = tiny_model("llama", seed=1, num_hidden_layers=1)
    student.model.save_pretrained(tmp_path / "student")
    student.tokenizer.save_pretrained(tmp_path / "student")
    teacher = tiny_model("llama", seed=0, num_hidden_layers=12)
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.tokenizer.save_pretrained(tmp_path / "teacher")
    data = {"calibration": str(text), "calibration_blocks": 4, "block_len": 32, "eval_tokens": 256, "window": 64,
            "stride": 64}
    fits = in_memory_bytes(open_lazy(tmp_path / "student"), 4 * 32)
    over = open_lazy(tmp_path / "teacher").bytes_in(torch.float32) + PROCESS_BYTES
    assert fits < over
    budget = (fits + over) // 2  # the student fits, the teacher does not
    step = {"distill.kd": {"teacher": str(tmp_path / "teacher"), "teacher_cache": True, **KD}}
    recipe = Recipe.from_dict({"model": str(tmp_path / "student"), "seed": 0, "data": data, "steps": [step],
                               "metrics": ["ppl"]})  # fmt: skip
    run_recipe(recipe, tmp_path / "run", max_memory=budget)
    record = read_lineage(tmp_path / "run")[0]
    assert "streamed" not in record["details"] and record["details"]["teacher_cache"] is True
    step["distill.kd"]["teacher_cache"] = False
    with pytest.raises(ConfigError, match="does not fit --max-memory beside the student"):
        run_recipe(Recipe.from_dict({"model": str(tmp_path / "student"), "seed": 0, "data": data, "steps": [step]}),
                   tmp_path / "run2", max_memory=budget)  # fmt: skip
