"""Sentence encoders load, embed and save exactly as sentence-transformers does."""

from __future__ import annotations

import json

import pytest
import torch

from kompakt.errors import KompaktError, ModelFormatError
from kompakt.model.arch import ENCODER_FAMILIES, arch_for, decoder_layers, embeddings_tied, linear_modules
from kompakt.model.encode import embed, input_limit
from kompakt.model.load import load
from kompakt.model.save import save_model
from kompakt.model.sentence import Pooling, pool, read_pooling
from kompakt.model.tiny import tiny_model
from kompakt.model.tiny_encoder import TINY_ENCODERS, tiny_encoder

SENTENCES = ["The cat sits on the mat.", "A completely different sentence, with punctuation!", "short"]


def test_every_tiny_encoder_family_is_in_the_table():
    assert set(TINY_ENCODERS) == set(ENCODER_FAMILIES)


@pytest.mark.parametrize("family", TINY_ENCODERS)
def test_save_load_gives_sentence_transformers_embeddings(family, tmp_path):
    from sentence_transformers import SentenceTransformer

    loaded = tiny_encoder(family)
    expected = embed(loaded, SENTENCES)
    assert expected.shape == (3, 64)
    assert torch.allclose(expected.norm(dim=-1), torch.ones(3), atol=1e-5)  # normalised
    save_model(loaded, tmp_path / "enc")
    reloaded = load(tmp_path / "enc", device="cpu")
    assert reloaded.is_encoder and reloaded.pooling == loaded.pooling
    assert torch.allclose(embed(reloaded, SENTENCES), expected, atol=1e-6)
    st = SentenceTransformer(str(tmp_path / "enc"), device="cpu")
    assert torch.allclose(torch.as_tensor(st.encode(SENTENCES)), expected, atol=1e-5)


@pytest.mark.parametrize("family", TINY_ENCODERS)
def test_arch_roles_resolve_on_encoders(family):
    loaded = tiny_encoder(family)
    spec = arch_for(loaded)
    assert spec.encoder and spec.lm_head is None and not embeddings_tied(loaded.model)
    layers = decoder_layers(loaded.model)
    assert len(layers) == 4
    roles = linear_modules(layers[0], spec)
    assert "attn.o" in roles and "mlp.down" in roles
    assert all(isinstance(module, torch.nn.Linear) for module in roles.values())


def test_batching_order_and_truncation_rule():
    loaded = tiny_encoder("bert")
    long = "word " * 1000  # far past the 128-position table: truncated, not a crash
    together = embed(loaded, [SENTENCES[0], long, SENTENCES[1]], batch_size=2)
    alone = torch.cat([embed(loaded, [s]) for s in (SENTENCES[0], long, SENTENCES[1])])
    assert torch.allclose(together, alone, atol=1e-5)
    assert input_limit(loaded) == 128


def test_pooling_modes():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    assert pool(hidden, mask, Pooling("mean")).tolist() == [[2.0, 1.0]]
    assert pool(hidden, mask, Pooling("cls")).tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, Pooling("max")).tolist() == [[3.0, 2.0]]
    assert pool(hidden, mask, Pooling("lasttoken")).tolist() == [[3.0, 2.0]]
    assert torch.allclose(pool(hidden, mask, Pooling("mean", normalize=True)).norm(), torch.tensor(1.0))


def test_read_pooling_defaults_and_bad_files(tmp_path):
    assert read_pooling(tmp_path, 512) == Pooling("mean", False, 512)  # sentence-transformers' default
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(ModelFormatError):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]))  # fmt: skip
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}))  # fmt: skip
    with pytest.raises(ModelFormatError, match="exactly one"):
        read_pooling(tmp_path)


def test_a_causal_lm_is_not_embedded():
    with pytest.raises(KompaktError, match="not a sentence encoder"):
        embed(tiny_model("llama"), SENTENCES)


@pytest.mark.slow
def test_embedded_minilm_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    loaded = load("all-minilm-l6-v2", device="cpu")
    assert loaded.is_encoder and loaded.pooling == Pooling("mean", True, 256)
    assert loaded.num_parameters() == 22_713_216
    st = SentenceTransformer(str(loaded.path), device="cpu")
    assert torch.allclose(embed(loaded, SENTENCES), torch.as_tensor(st.encode(SENTENCES)), atol=1e-5)


def test_do_lower_case_is_read_applied_and_written_back(tmp_path):
    """sentence_bert_config.json's do_lower_case: sentence-transformers lowercases the text before
    its tokenizer sees it; kompakt does the same, and a saved model keeps the flag."""
    import dataclasses

    from sentence_transformers import SentenceTransformer

    loaded = tiny_encoder("roberta")  # a byte-level tokenizer: case reaches the model
    upper, lower = ["The CAT sits on the MAT."], ["the cat sits on the mat."]
    assert not torch.allclose(embed(loaded, upper), embed(loaded, lower))
    loaded.pooling = dataclasses.replace(loaded.pooling, lower_case=True)
    assert torch.equal(embed(loaded, upper), embed(loaded, lower))
    save_model(loaded, tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "sentence_bert_config.json").read_text())["do_lower_case"] is True
    assert read_pooling(tmp_path / "enc").lower_case
    st = SentenceTransformer(str(tmp_path / "enc"), device="cpu")
    assert torch.allclose(torch.as_tensor(st.encode(upper)), embed(loaded, upper), atol=1e-5)
