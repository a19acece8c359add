"""`evaluate`: one call, JSON-ready result that states the protocol."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import kompakt.evaluate.api as api
from kompakt.errors import ConfigError
from kompakt.evaluate import evaluate, perplexity
from kompakt.model.tiny import TINY_VOCAB, tiny_model


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_candidate_only(model):
    ids = _ids(300)
    result = evaluate(model, ids=ids, window=100, speed=False)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["ppl"] == pytest.approx(perplexity(model, ids, window=100).ppl)
    assert (out["window"], out["stride"], out["tokens_used"], out["tokens_scored"]) == (100, 100, 300, 297)
    assert out["parameters"] == model.num_parameters()
    assert out["disk_bytes"] is None and out["peak_rss_bytes"] > 0 and out["threads"] >= 1
    assert out["kl_mean"] is None and out["speed"] is None


def test_with_reference_and_speed(model, monkeypatch):
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        candidate.model.lm_head.weight.mul_(0.5)
    ids = _ids(300)
    monkeypatch.setattr(api, "measure_speed", lambda loaded: api.SpeedResult(10.0, 2.0, 1, "torch cpu", "cpu"))
    result = evaluate(candidate, model, ids, window=100, stride=50)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["reference"] == model.name
    assert out["kl_mean"] > 0 and 0 <= out["top1"] <= 1 and out["kl_p99"] >= out["kl_mean"]
    assert out["ppl"] == pytest.approx(perplexity(candidate, ids, window=100, stride=50).ppl, rel=1e-5)
    assert out["ppl_reference"] == pytest.approx(perplexity(model, ids, window=100, stride=50).ppl, rel=1e-5)
    assert out["speed"]["prefill_tokens_per_s"] == 10.0


def test_self_generated_text_by_reference(model, monkeypatch):
    calls = []

    def fake_load(data, loaded, n_tokens):
        calls.append((data, loaded, n_tokens))
        return _ids(n_tokens)

    monkeypatch.setattr(api, "_load_ids", fake_load)
    candidate = copy.deepcopy(model)
    result = evaluate(candidate, model, window=100, max_tokens=200, speed=False)
    assert result.data == "self-generated"
    assert calls == [(None, model, 200)]  # the reference writes the text


def test_errors_before_loading_data(model, monkeypatch):
    monkeypatch.setattr(api, "_load_ids", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ConfigError, match="context"):
        evaluate(model, window=model.context_length + 1)
    with pytest.raises(ConfigError, match="max-tokens"):
        evaluate(model, window=100, max_tokens=50)


def test_kompakt_evaluate_is_callable(model):
    import kompakt
    import kompakt.evaluate  # rebinds kompakt.evaluate to the package: it must stay callable

    result = kompakt.evaluate(model, ids=_ids(200), window=100, speed=False)
    assert result.tokens_scored == 198
