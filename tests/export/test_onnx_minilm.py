"""ONNX export of the embedded all-MiniLM-L6-v2 (slow): f32 equals kompakt's embeddings, int8 stays close."""

from __future__ import annotations

import numpy as np
import pytest

from kompakt.export import export
from kompakt.export.onnx_speed import onnx_embed
from kompakt.model.encode import embed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from kompakt.model.load import load

    return load("all-minilm-l6-v2", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sentences(wikitext_test):
    """The first 50 WikiText-2 test sentences (kompakt's splitting rule, headings left out)."""
    from kompakt.data.sentences import read_sentences

    return [s for s in read_sentences(wikitext_test) if "=" not in s][:50]


@pytest.mark.parametrize("type", ["f32", "int8"])
def test_minilm_onnx_matches_embed(type, minilm, sentences, tmp_path):
    result = export(minilm, format="onnx", type=type, out=tmp_path / "enc")
    assert result.check.passed
    assert _inputs(tmp_path / "enc") == ["input_ids", "attention_mask", "token_type_ids"]
    got, want = onnx_embed(tmp_path / "enc" / "model.onnx", sentences, 16), embed(minilm, sentences).numpy()
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    if type == "f32":
        assert np.abs(got - want).max() <= 1e-4
    else:
        assert cosine.mean() >= 0.99, f"int8 mean cosine {cosine.mean():.4f}, lowest {cosine.min():.4f}"
        assert result.size_bytes < 0.3 * 90e6  # int8 MatMul weights, fp32 embedding table


def _inputs(directory) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(directory / "model.onnx"), load_external_data=False).graph.input]
