"""Fidelity: KL(reference || candidate), top-1 agreement, both perplexities."""

from __future__ import annotations

import copy

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.evaluate import fidelity, perplexity
from kompakt.model.tiny import TINY_VOCAB, tiny_model


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_model_against_itself(model):
    ids = _ids(450)
    result = fidelity(model, model, ids, window=100)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert result.kl_p99 == pytest.approx(0.0, abs=1e-7)
    assert result.top1 == 1.0
    assert result.tokens == 4 * 99 + 49
    assert result.ppl_reference == pytest.approx(perplexity(model, ids, window=100).ppl, rel=1e-6)
    assert result.ppl_candidate == result.ppl_reference


def test_perturbed_copy(model):
    candidate = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in candidate.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    ids = _ids(400)
    result = fidelity(model, candidate, ids, window=100, stride=50)
    assert result.kl_mean > 1e-4
    assert result.kl_p99 >= result.kl_mean
    assert 0.0 <= result.top1 < 1.0
    assert result.tokens == 399
    assert result.ppl_candidate == pytest.approx(perplexity(candidate, ids, window=100, stride=50).ppl, rel=1e-5)
    assert result.ppl_reference == pytest.approx(perplexity(model, ids, window=100, stride=50).ppl, rel=1e-5)


def test_kl_matches_direct_computation(model):
    candidate = tiny_model("llama", seed=1)
    ids = _ids(100)
    result = fidelity(model, candidate, ids, window=100)
    with torch.no_grad():
        p = model.model(ids[None]).logits[0, :-1].log_softmax(-1)
        q = candidate.model(ids[None]).logits[0, :-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert result.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert result.top1 == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))


def test_different_vocabularies(model):
    other = tiny_model("llama", vocab_size=TINY_VOCAB + 16)
    with pytest.raises(ConfigError, match="vocabularies"):
        fidelity(model, other, _ids(200), window=100)
