"""Bad input to the training passes: each stops with a one-line KompaktError that says what to do."""

from __future__ import annotations

import json

import pytest

from kompakt.errors import ConfigError, DataError, KompaktError
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

FAST = {"steps": 1, "seq_len": 32, "batch_size": 2, "checkpoint_every": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _apply(name, student, teacher, **values):
    spec = get_pass(name)
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, KompaktError)
    return message


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the small model learns from the big one. " * 200)
    return path


@pytest.mark.parametrize("name", ["distill.kd", "quant.qat", "finetune.lora"])
def test_teacher_with_another_vocabulary_is_refused(name, text):
    teacher = tiny_model("llama", vocab_size=300)
    with pytest.raises(ConfigError) as error:
        _apply(name, tiny_model("llama"), teacher, data=str(text), **FAST)
    message = _one_line(error)
    assert "different vocabularies (300 vs 272 output tokens)" in message and "same tokenizer" in message


def test_same_size_but_different_tokens_is_refused(text):
    teacher = tiny_model("llama")
    teacher.tokenizer = tiny_model("llama").tokenizer
    teacher.tokenizer.add_tokens(["<extra>"])  # 262 tokens, still inside the 272-row head
    with pytest.raises(ConfigError, match="different token ids"):
        _apply("distill.kd", tiny_model("llama"), teacher, data=str(text), **FAST)


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError) as error:
        _apply("distill.kd", tiny_model("llama"), tiny_model("llama"), data=str(empty), **FAST)
    assert "is empty" in _one_line(error)


def test_dataset_shorter_than_a_batch(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(DataError) as error:
        _apply("distill.kd", tiny_model("llama"), tiny_model("llama"), data=str(short), **FAST)
    message = _one_line(error)
    assert "fewer than one batch of 2 x 32" in message and "lower batch_size / seq_len" in message


def test_lora_targets_matching_nothing_list_the_modules(text):
    with pytest.raises(ConfigError) as error:
        _apply("finetune.lora", tiny_model("llama"), tiny_model("llama"), data=str(text),
               target_modules=["qkv", "dense_h_to_4h"], **FAST)  # fmt: skip
    message = _one_line(error)
    assert "['qkv', 'dense_h_to_4h'] match no Linear" in message
    assert "q_proj" in message and "down_proj" in message and "lm_head" in message


def test_chat_jsonl_without_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "hi", "answer": "hello"}) + "\n")
    with pytest.raises(DataError) as error:
        _apply("finetune.lora", tiny_model("llama"), tiny_model("llama"), data=str(path), **FAST)
    assert "line 2: chat record without 'messages'" in _one_line(error)
    path.write_text(json.dumps({"prompt": "hi", "answer": "hello"}) + "\n")  # no line has messages
    with pytest.raises(DataError) as error:
        _apply("finetune.lora", tiny_model("llama"), tiny_model("llama"), data=str(path), **FAST)
    assert "'messages' list" in _one_line(error)


def test_chat_without_an_answer(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        _apply("finetune.lora", tiny_model("llama"), tiny_model("llama"), data=str(path), **FAST)


def test_quantized_models_are_refused_where_training_would_leave_the_grid(text):
    student = tiny_model("llama")
    _apply("quant.rtn", student, student, bits=4, group_size=32)
    for name in ("distill.kd", "finetune.lora"):
        with pytest.raises(ConfigError, match="quant.qat"):
            _apply(name, student, tiny_model("llama"), data=str(text), **FAST)


@pytest.mark.parametrize("name, values, message", [
    ("distill.kd", {"alpha": 1.5}, "alpha must lie in"),
    ("distill.kd", {"divergence": "kl"}, "divergence 'kl' is unknown"),
    ("distill.kd", {"tokens": None, "steps": None}, "give a budget"),
    ("distill.kd", {"seq_len": 0}, "seq_len must be positive"),
    ("distill.kd", {"temp": 2}, "unknown field"),
    ("quant.qat", {"bits": 5}, "bits 5"),
    ("finetune.lora", {"r": 0}, "r >= 1"),
    ("finetune.lora", {"kd_weight": 2.0}, "kd_weight"),
])  # fmt: skip
def test_bad_configs(name, values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(get_pass(name), values)
