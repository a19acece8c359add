"""The training loop: schedule, budget, accumulation, exact resume from a checkpoint, refusal of
another run's checkpoint, and the stop on NaN / exploding loss that keeps the last checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from kompakt.errors import ConfigError, OutputPathError
from kompakt.model.tiny import tiny_model
from kompakt.train import checkpoint as ckpt
from kompakt.train.data import SequenceBatches, TrainData
from kompakt.train.loop import LoopConfig, TrainingDiverged, choose_precision, train
from kompakt.train.objectives import DistillObjective
from kompakt.train.schedule import warmup_cosine, warmup_steps_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n_tokens: int = 4096, seq_len: int = 32, batch_size: int = 4, seed: int = 0) -> SequenceBatches:
    ids = torch.randint(3, 200, (n_tokens,), generator=torch.Generator().manual_seed(5))
    return SequenceBatches(TrainData.plain(ids, "random"), seq_len=seq_len, batch_size=batch_size, seed=seed)


def _setup(**overrides):
    teacher = tiny_model("llama", seed=0)
    student = tiny_model("llama", seed=1)
    objective = DistillObjective(teacher.model, alpha=0.5, temperature=2.0)
    config = LoopConfig(**{"steps": 8, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup": 2, **overrides})
    return student, objective, config


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_warmup_then_cosine():
    assert warmup_cosine(0, warmup_steps=4, total_steps=20) == pytest.approx(0.2)
    assert warmup_cosine(3, warmup_steps=4, total_steps=20) == pytest.approx(0.8)
    assert warmup_cosine(4, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert warmup_cosine(12, warmup_steps=4, total_steps=20, min_ratio=0.0) == pytest.approx(0.5)
    assert warmup_cosine(20, warmup_steps=4, total_steps=20, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_steps_for(0.1, 50) == 5 and warmup_steps_for(3, 50) == 3 and warmup_steps_for(0.5, 1) == 0


def test_budget_in_tokens_or_steps():
    assert LoopConfig(tokens=10_000, batch_size=4, seq_len=256).total_steps() == 10  # ceil(10000 / 1024)
    assert LoopConfig(tokens=10_000, steps=3).total_steps() == 3
    with pytest.raises(ConfigError, match="budget"):
        LoopConfig().total_steps()


def test_precision_follows_the_hardware():
    from kompakt.model.dtype import cpu_has_native_bf16

    assert choose_precision(torch.device("cpu")) == ("bf16" if cpu_has_native_bf16() else "no")


def test_training_lowers_the_loss_and_reports_throughput():
    student, objective, config = _setup(steps=30, eval_every=10)
    before = _weights(student.model)
    result = train(student.model, _batches(), objective, config, evaluate=lambda m: {"x": 1.0})
    assert result.steps == 30 and result.tokens == 30 * 4 * 32
    first, last = result.history[0]["loss"], sum(r["loss"] for r in result.history[-5:]) / 5
    assert last < first
    assert result.tokens_per_s > 0 and [e["step"] for e in result.evals] == [0, 10, 20, 30]
    assert not student.model.training
    assert any(not torch.equal(before[k], v) for k, v in student.model.state_dict().items())


def test_gradient_accumulation_matches_a_bigger_batch():
    a, objective, config = _setup(steps=3, warmup=0)
    b = tiny_model("llama", seed=1)
    result_a = train(a.model, _batches(batch_size=4), objective, config)
    config_b = LoopConfig(steps=3, batch_size=2, grad_accum=2, seq_len=32, lr=3e-3, warmup=0)
    # the same sequences per step: batch b of size 4 == micro-batches 2b, 2b+1 of size 2 in the same order
    batches = _batches(batch_size=4)
    batches_b = _batches(batch_size=2)
    batches_b.batch = lambda position: tuple(t[(position % 2) * 2 : (position % 2) * 2 + 2]
                                             for t in batches.batch(position // 2))  # fmt: skip
    result_b = train(b.model, batches_b, objective, config_b)
    # Adam turns rounding-level gradients into +-lr steps, so compare what training does (losses)
    losses_a = [r["loss"] for r in result_a.history]
    assert [r["loss"] for r in result_b.history] == pytest.approx(losses_a, rel=1e-4)
    # and the gradients' size: Adam and clipping would hide micro-batch gradients summed, not averaged
    norms_a = [r["grad_norm"] for r in result_a.history]
    assert [r["grad_norm"] for r in result_b.history] == pytest.approx(norms_a, rel=1e-3, abs=2e-4)
    assert result_b.tokens == result_a.tokens


def test_killed_run_resumes_exactly(tmp_path):
    """Stopped after 5 steps with checkpoints every 2 (step 5 is lost, as in a kill), a fresh
    process-like restart resumes from step 4 and ends with the uninterrupted run's weights."""
    straight, objective, config = _setup(steps=9, checkpoint_every=2)
    train(straight.model, _batches(), objective, config)

    torch.manual_seed(123)  # the restart must not depend on the global RNG of the killed run
    first, objective, config = _setup(steps=9, checkpoint_every=2)
    partial = train(first.model, _batches(), objective, config, checkpoint_dir=tmp_path, identity="run", stop_after=5)
    assert partial.steps == 5 and ckpt.latest(tmp_path).name == "step-0000004"

    torch.manual_seed(999)
    resumed, objective, config = _setup(steps=9, checkpoint_every=2)
    result = train(resumed.model, _batches(), objective, config, checkpoint_dir=tmp_path, identity="run")
    assert result.resumed_from == 4 and result.steps == 9
    assert [r["step"] for r in result.history] == list(range(1, 10))
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_checkpoint_of_another_run_is_refused(tmp_path):
    student, objective, config = _setup(steps=4, checkpoint_every=2)
    train(student.model, _batches(), objective, config, checkpoint_dir=tmp_path, identity="recipe-a", stop_after=3)
    student, objective, config = _setup(steps=4, checkpoint_every=2)
    with pytest.raises(OutputPathError, match="belongs to a different run"):
        train(student.model, _batches(), objective, config, checkpoint_dir=tmp_path, identity="recipe-b")


class _NanAfter:
    """Wraps an objective: the loss turns NaN from call `after` on."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def extra_modules(self):
        return {}

    def __call__(self, model, ids, labels):
        self.calls += 1
        loss, parts = self.inner(model, ids, labels)
        return (loss * math.nan if self.calls > self.after else loss), parts


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    student, objective, config = _setup(steps=10, checkpoint_every=2)
    with pytest.raises(TrainingDiverged) as error:
        train(student.model, _batches(), _NanAfter(objective, 5), config, checkpoint_dir=tmp_path, identity="r")
    message = str(error.value)
    assert "\n" not in message and "step 6: loss nan" in message
    assert "step-0000004" in message and "lower lr" in message
    assert ckpt.latest(tmp_path).name == "step-0000004"


def test_exploding_loss_stops():
    student, objective, config = _setup(steps=10)

    class Explode(_NanAfter):
        def __call__(self, model, ids, labels):
            self.calls += 1
            loss, parts = self.inner(model, ids, labels)
            return (loss * 1000 if self.calls > self.after else loss), parts

    with pytest.raises(TrainingDiverged, match="exploded.*no checkpoint was written"):
        train(student.model, _batches(), Explode(objective, 5), config)
