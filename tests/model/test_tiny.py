"""Tiny models: every family builds, runs, and survives save -> from_pretrained unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kompakt.model.tiny import TINY_FAMILIES, save_tiny, tiny_model, tiny_tokenizer


def test_tokenizer_round_trips_any_text():
    tokenizer = tiny_tokenizer()
    text = "héllo wörld — 123 \n\t😀"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < 272


def test_chat_template_renders():
    rendered = tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_reload_same_logits(family, tmp_path):
    loaded = save_tiny(family, tmp_path)
    ids = torch.tensor([[5, 17, 90, 200, 33, 7]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is not None


def test_fingerprint_changes_with_weights():
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert first.fingerprint() == second.fingerprint()
    with torch.no_grad():
        second.model.lm_head.weight.add_(1.0)
    second._fingerprint = None
    assert first.fingerprint() != second.fingerprint()
