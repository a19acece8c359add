"""Encoder evaluation on the embedded all-MiniLM-L6-v2: itself, weights rounded to bfloat16, and
its first 3 of 6 layers (no healing) must rank as expected on the shipped held-out sentences."""

from __future__ import annotations

import copy

import pytest
import torch

from kompakt.evaluate import evaluate_encoder

pytestmark = pytest.mark.slow
SENTENCES = 300


@pytest.fixture(scope="module")
def minilm():
    from kompakt.model.load import load

    return load("all-minilm-l6-v2")


def _bf16_rounded(loaded):
    other = copy.deepcopy(loaded)
    with torch.no_grad():
        for param in other.model.parameters():
            param.copy_(param.to(torch.bfloat16).to(param.dtype))
    return other


def _first_layers(loaded, n: int):
    from kompakt.model.arch import decoder_layers

    other = copy.deepcopy(loaded)
    layers = decoder_layers(other.model)
    del layers[n:]
    return other


def test_minilm_itself_bf16_and_truncated_rank_as_expected(minilm):
    same = evaluate_encoder(minilm, minilm, max_sentences=SENTENCES, speed=False)
    assert same.cosine_mean == pytest.approx(1.0, abs=1e-5) and same.recall_at_k == 1.0
    rounded = evaluate_encoder(_bf16_rounded(minilm), minilm, max_sentences=SENTENCES, speed=False)
    half = evaluate_encoder(_first_layers(minilm, 3), minilm, max_sentences=SENTENCES, speed=False)
    assert rounded.cosine_mean > 0.995 and rounded.recall_at_k > 0.9 and rounded.spearman > 0.98
    assert half.cosine_mean < rounded.cosine_mean
    assert half.recall_at_k < rounded.recall_at_k
    assert half.spearman < rounded.spearman
    print(f"bf16: {rounded.cosine_mean:.4f} {rounded.recall_at_k:.3f} {rounded.spearman:.4f}; "
          f"3 of 6 layers: {half.cosine_mean:.4f} {half.recall_at_k:.3f} {half.spearman:.4f}")  # fmt: skip


def test_minilm_speed_is_measured_on_real_sentences(minilm):
    result = evaluate_encoder(minilm, None, max_sentences=64, threads=1)
    assert result.speed.batched_per_s > result.speed.batch1_per_s > 0
    assert result.parameters == 22_713_216 and result.truncation[0].limit == 256
