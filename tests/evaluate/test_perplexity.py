"""Perplexity: window/stride scoring math, exact values on a uniform model, errors."""

from __future__ import annotations

import math

import pytest
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.evaluate import perplexity
from kompakt.evaluate.windows import plan_windows
from kompakt.model.tiny import TINY_VOCAB, tiny_model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def uniform():
    loaded = tiny_model("llama")
    with torch.no_grad():
        loaded.model.lm_head.weight.zero_()  # every logit 0 -> uniform distribution
    return loaded


@pytest.mark.parametrize(
    "n, window, stride, scored",
    [
        (1000, 100, 100, 10 * 99),  # non-overlapping: each window scores its last window - 1
        (1050, 100, 100, 10 * 99 + 49),  # a shorter tail window scores its last 49
        (1001, 100, 100, 10 * 99),  # a 1-token tail scores nothing
        (1000, 100, 50, 999),  # sliding: every token but the first, once
        (1020, 100, 30, 1019),
        (100, 100, 100, 99),
    ],
)
def test_uniform_model_ppl_is_vocab_and_counts(uniform, n, window, stride, scored):
    result = perplexity(uniform, _ids(n), window=window, stride=stride, batch_size=3)
    assert result.tokens_scored == scored
    assert result.tokens_used == n
    assert (result.window, result.stride) == (window, stride)
    assert result.ppl == pytest.approx(TINY_VOCAB, rel=1e-5)
    assert result.nll_mean == pytest.approx(math.log(TINY_VOCAB), rel=1e-6)


@pytest.mark.parametrize("n, window, stride", [(1000, 100, 50), (1020, 100, 30), (1000, 128, 1)])
def test_sliding_windows_score_each_token_once(n, window, stride):
    counts = torch.zeros(n, dtype=torch.long)
    for item in plan_windows(n, window, stride):
        assert item.length <= window
        counts[item.start + item.score_from : item.end] += 1
    assert counts[0] == 0 and bool((counts[1:] == 1).all())


def test_one_window_equals_direct_cross_entropy(model):
    ids = _ids(300)
    result = perplexity(model, ids, window=300)
    with torch.no_grad():
        logits = model.model(ids[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    assert result.tokens_scored == 299
    assert result.nll_mean == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("n, stride, scored", [(400, 100, 4 * 99), (300, 50, 299)])
def test_windows_match_windows_scored_by_hand(model, n, stride, scored):
    """Windows of 100 every `stride` tokens: the first scores its 99 next tokens, each later one
    only the tokens after the previous window's end (stride 100: its own 99; stride 50: its last
    50, each seeing the 50 tokens before them)."""
    ids = _ids(n)
    result = perplexity(model, ids, window=100, stride=stride, batch_size=2)
    total = 0.0
    with torch.no_grad():
        for start in range(0, n - 100 + 1, stride):
            chunk = ids[start : start + 100]
            logits = model.model(chunk[None]).logits[0]
            first = 0 if start == 0 else max(0, 100 - stride - 1)  # logits at position i predict token i + 1
            total += float(torch.nn.functional.cross_entropy(logits[first:-1], chunk[first + 1 :], reduction="sum"))
    assert result.tokens_scored == scored
    assert result.nll_mean == pytest.approx(total / scored, rel=1e-5)


def test_batch_size_and_max_tokens(model):
    ids = _ids(700)
    one = perplexity(model, ids, window=100, batch_size=1)
    many = perplexity(model, ids, window=100, batch_size=8)
    assert one.ppl == pytest.approx(many.ppl, rel=1e-5)
    cut = perplexity(model, ids, window=100, max_tokens=300)
    assert (cut.tokens_used, cut.tokens_scored) == (300, 297)
    assert cut.ppl == pytest.approx(perplexity(model, ids[:300], window=100).ppl, rel=1e-6)


def test_accepts_bare_transformers_model_and_2d_ids(model):
    ids = _ids(200)
    assert perplexity(model.model, ids[None], window=100).ppl == pytest.approx(
        perplexity(model, ids, window=100).ppl, rel=1e-6
    )


def test_window_longer_than_context(model):
    context = model.context_length
    with pytest.raises(ConfigError, match="context") as info:
        perplexity(model, _ids(2 * context), window=context + 1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(window=100, stride=101), ConfigError),
        (dict(window=100, stride=0), ConfigError),
        (dict(window=1), ConfigError),
        (dict(window=100, max_tokens=50), ConfigError),
        (dict(window=300), DataError),  # only 200 tokens
    ],
)
def test_bad_inputs(model, kwargs, error):
    with pytest.raises(error):
        perplexity(model, _ids(200), **kwargs)
