"""ONNX export of the embedded all-MiniLM-L6-v2 (slow): f32 equals kompakt's embeddings, int8 stays close."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kompakt.export import export
from kompakt.model.encode import embed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from kompakt.model.load import load

    return load("all-minilm-l6-v2", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sentences(wikitext_test):
    """50 held-out WikiText-2 test sentences (no heading lines), 4 to ~60 words."""
    text = wikitext_test.read_text(encoding="utf-8")
    found = [s.strip() for s in re.split(r"(?<=[.!?]) ", text) if 20 < len(s.strip()) < 400 and "=" not in s]
    return found[:50]


def _onnx_embeddings(directory, sentences):
    import onnxruntime
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(sentences), 16):
        encoded = tokenizer(sentences[start : start + 16], padding=True, truncation=True, return_tensors="np")
        feeds = {i.name: encoded[i.name] for i in session.get_inputs()}
        out.append(session.run(["sentence_embedding"], feeds)[0])
    return np.concatenate(out)


@pytest.mark.parametrize("type", ["f32", "int8"])
def test_minilm_onnx_matches_embed(type, minilm, sentences, tmp_path):
    result = export(minilm, format="onnx", type=type, out=tmp_path / "enc")
    assert result.check.passed
    assert _inputs(tmp_path / "enc") == ["input_ids", "attention_mask", "token_type_ids"]
    got, want = _onnx_embeddings(tmp_path / "enc", sentences), embed(minilm, sentences).numpy()
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    if type == "f32":
        assert np.abs(got - want).max() <= 1e-4
    else:
        assert cosine.mean() >= 0.99, f"int8 mean cosine {cosine.mean():.4f}, lowest {cosine.min():.4f}"
        assert result.size_bytes < 0.3 * 90e6  # int8 MatMul weights, fp32 embedding table


def _inputs(directory) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(directory / "model.onnx"), load_external_data=False).graph.input]
