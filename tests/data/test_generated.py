"""Self-generated calibration text: deterministic, cached on disk as jsonl, reused without sampling."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from kompakt.data import generate_texts, generated, load_tokens, loader
from kompakt.model.tiny import tiny_model

SMALL = dict(batch_size=2, max_new_tokens=6)


# Tiny-model generation is dominated by per-step overhead; extra threads only contend.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama")


def test_deterministic_and_seed_dependent(loaded):
    rng_before = torch.random.get_rng_state()
    first = generate_texts(loaded, 10, seed=1, cache=False, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert generate_texts(loaded, 10, seed=1, cache=False, **SMALL) == first
    assert generate_texts(loaded, 10, seed=2, cache=False, **SMALL) != first
    assert len(first) == 2 and all(t.startswith("<|im_start|>user\n") for t in first)


def test_base_model_starts_from_bos(loaded, monkeypatch):
    monkeypatch.setattr(loaded.tokenizer, "chat_template", None)
    texts = generate_texts(loaded, 5, seed=0, cache=False, **SMALL)
    assert all(t.startswith("<s>") for t in texts)


def test_cache_hit_does_not_generate(loaded, tmp_path, monkeypatch):
    texts = generate_texts(loaded, 300, seed=0, cache_dir=tmp_path, **SMALL)
    files = list(tmp_path.iterdir())
    assert [p.suffix for p in files] == [".jsonl"]  # no temp file left behind
    rows = [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts and sum(r["n_tokens"] for r in rows) >= 300

    def no_sampling(*args, **kwargs):
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(generated, "_generate_batch", no_sampling)
    assert generate_texts(loaded, 300, seed=0, cache_dir=tmp_path, **SMALL) == texts
    # A smaller request is served, batch by batch, from the larger file.
    smaller = generate_texts(loaded, 150, seed=0, cache_dir=tmp_path, **SMALL)
    assert smaller == texts[: len(smaller)] and len(smaller) % SMALL["batch_size"] == 0
    monkeypatch.undo()
    assert generate_texts(loaded, 150, seed=0, cache=False, **SMALL) == smaller


def test_cache_key_includes_seed_and_options(loaded, tmp_path):
    generate_texts(loaded, 10, seed=0, cache_dir=tmp_path, **SMALL)
    generate_texts(loaded, 10, seed=1, cache_dir=tmp_path, **SMALL)
    generate_texts(loaded, 10, seed=0, cache_dir=tmp_path, batch_size=2, max_new_tokens=5)
    assert len(list(tmp_path.glob("*.jsonl"))) == 3


def test_load_tokens_generated_uses_default_cache(loaded, tmp_path, monkeypatch):
    pytest.importorskip("kompakt.model.cache")
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path))
    calls = []
    real = generated._generate_batch
    monkeypatch.setattr(generated, "_generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(loader, "generate_texts", functools.partial(generated.generate_texts, **SMALL))
    ids = load_tokens(None, loaded, n_tokens=64)
    assert ids.shape == (64,) and ids.dtype == torch.long
    assert list((tmp_path / "data").glob("*.jsonl"))
    n_calls = len(calls)
    assert torch.equal(load_tokens("generated", loaded, n_tokens=64), ids)
    assert len(calls) == n_calls


def test_load_tokens_user_data(loaded, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello world " * 50, encoding="utf-8")
    ids = load_tokens(path, loaded, n_tokens=100)
    assert ids.tolist() == loaded.tokenizer("hello world " * 50, add_special_tokens=False).input_ids[:100]
    assert load_tokens(path, loaded).numel() == 600


def test_model_generation_defaults_ignored():
    loaded = tiny_model("llama")
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(100)  # peaky logits, so penalties change the samples
    expected = generate_texts(loaded, 10, seed=3, cache=False, **SMALL)
    loaded.model.generation_config.repetition_penalty = 100.0
    loaded.model.generation_config.no_repeat_ngram_size = 1
    assert generate_texts(loaded, 10, seed=3, cache=False, **SMALL) == expected
