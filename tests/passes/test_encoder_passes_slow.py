"""Passes on the embedded all-MiniLM-L6-v2 (real weights): GPTQ beats RTN on the embeddings, a
quantized step saved packed reloads with the same embeddings, and scored depth pruning keeps the
embeddings closer than DistilBERT's every-other initialisation before any healing (measured in
bench/encoder_passes.py: 0.74 vs 0.32 mean cosine for 6 -> 3 layers).

Held-out sentences: WikiText-2 test; calibration: WikiText-2 validation (never the same text).
Each test stays well under a minute on a loaded 2-core machine (subsets of Linears / sentences).
"""

from __future__ import annotations

import copy

import pytest
import torch

import kompakt
from kompakt.data.sentence_batches import sentence_batch
from kompakt.data.sentences import split_sentences
from kompakt.model.encode import embed
from kompakt.model.loaded import LoadedModel
from kompakt.passes.base import PassContext, build_config, get_pass

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return kompakt.load("all-minilm-l6-v2", device="cpu")


def _sentences(path, drop_unk: bool = False) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = text.replace(" <unk>", "") if drop_unk else text
    return split_sentences([line for line in text.splitlines() if not line.strip().startswith("=")])


@pytest.fixture(scope="module")
def texts(wikitext_test):
    heldout = _sentences(wikitext_test)[:64]
    calibration = _sentences(wikitext_test.parent / "wiki.valid.tokens", drop_unk=True)
    return heldout, calibration


def _apply(name: str, original: LoadedModel, calibration, **values) -> LoadedModel:
    spec = get_pass(name)
    student = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name=original.name,
                          pooling=original.pooling)  # fmt: skip
    ctx = PassContext(loaded=student, original=lambda: original, calibration=lambda: calibration, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _cosine(model: LoadedModel, reference: torch.Tensor, sentences: list[str]) -> float:
    return float(torch.nn.functional.cosine_similarity(embed(model, sentences), reference, dim=-1).mean())


def test_gptq_beats_rtn_at_4_bits(minilm, texts):
    heldout, calibration = texts
    batch = sentence_batch(minilm, calibration, 64, 128)
    reference = embed(minilm, heldout)
    grid = {"bits": 4, "group_size": 128, "modules": "attn"}  # the attention Linears: GPTQ's quick part
    rtn = _cosine(_apply("quant.rtn", minilm, None, **grid).loaded, reference, heldout)
    gptq = _cosine(_apply("quant.gptq", minilm, batch, **grid).loaded, reference, heldout)
    assert gptq > rtn > 0.9, (gptq, rtn)


def test_packed_int8_step_reloads_with_the_same_embeddings(minilm, texts, tmp_path):
    from kompakt.rundir.stepsave import save_step_model

    heldout, _ = texts
    report = _apply("quant.rtn", minilm, None, bits=8, group_size=None)
    stored = save_step_model(report.loaded, tmp_path / "step", minilm.storage_dtype, report.packed_layers)
    assert stored["stored_as"] == "compressed-tensors" and stored["packed_layers"] == 36
    back = kompakt.load(tmp_path / "step", device="cpu")
    assert back.is_encoder and back.pooling == minilm.pooling
    # Packed: the Linears are exact; the rest (embeddings, norms) stored in 16 bits.
    torch.testing.assert_close(embed(back, heldout), embed(report.loaded, heldout), rtol=0, atol=2e-3)
    assert _cosine(back, embed(minilm, heldout), heldout) > 0.999


def test_scored_depth_keeps_more_than_every_other(minilm, texts):
    heldout, calibration = texts
    batch = sentence_batch(minilm, calibration, 32, 128)
    reference = embed(minilm, heldout)
    every_other = _apply("prune.depth", minilm, None, select="every_other")
    scored = _apply("prune.depth", minilm, batch, count=3, method="cosine", batch_size=8)
    assert every_other.details["removed_layers"] == [1, 3, 5]
    assert _cosine(scored.loaded, reference, heldout) > _cosine(every_other.loaded, reference, heldout) + 0.2
