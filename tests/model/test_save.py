"""save_model: loadable HF directory, storage dtype, tokenizer, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kompakt.errors import OutputPathError
from kompakt.model.save import save_model
from kompakt.model.tiny import TINY_FAMILIES, tiny_model

IDS = torch.randint(0, 260, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_reload_same_logits(family, tmp_path):
    loaded = tiny_model(family)
    path = save_model(loaded, tmp_path / "out")
    assert path == (tmp_path / "out").absolute()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)
    assert (path / "generation_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left


def test_tokenizer_and_chat_template_round_trip(tmp_path):
    loaded = tiny_model("llama")
    path = save_model(loaded, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == loaded.tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert tokenizer("héllo")["input_ids"] == loaded.tokenizer("héllo")["input_ids"]


def test_storage_dtype_is_written_without_touching_the_live_model(tmp_path):
    loaded = tiny_model("qwen2")  # tied embeddings: the shared tensor must still be written once
    loaded.storage_dtype = torch.bfloat16
    path = save_model(loaded, tmp_path / "out")
    assert loaded.compute_dtype == torch.float32
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
        assert "lm_head.weight" not in weights.keys()
    assert dtypes == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        original = loaded.model.state_dict()[name]
        if name.endswith("weight") or name.endswith("bias"):
            torch.testing.assert_close(tensor, original.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    loaded = tiny_model("llama")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_existing_target_intact(tmp_path, monkeypatch):
    first = tiny_model("llama", seed=1)
    path = save_model(first, tmp_path / "out")
    before = sorted(p.name for p in path.iterdir())
    second = tiny_model("llama", seed=2)
    monkeypatch.setattr(second.model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save_model(second, path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in path.iterdir()) == before
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(path)), _logits(first.model))


def test_existing_target_is_replaced(tmp_path):
    save_model(tiny_model("llama", seed=1), tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("old")
    second = tiny_model("llama", seed=2)
    path = save_model(second, tmp_path / "out")
    assert not (path / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(path)), _logits(second.model))


def test_target_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        save_model(tiny_model("llama"), tmp_path / "file")
