"""prune.vocab on sentence encoders: a WordPiece (BERT / MiniLM) vocabulary trimmed to a corpus
tokenizes kept-token text into the same pieces and embeds it exactly as before, other words fall
apart into kept pieces instead of [UNK], and the saved step loads in AutoModel and
SentenceTransformer with the embeddings kompakt computes."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast

import kompakt
from kompakt.errors import ConfigError
from kompakt.model.encode import embed
from kompakt.model.loaded import LoadedModel
from kompakt.model.sentence import Pooling
from kompakt.model.tiny_encoder import wordpiece_tokenizer
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.rundir.stepsave import save_step_model

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = get_pass("prune.vocab")
WORDS = ("the", "cat", "dog", "sat", "on", "mat", "run", "park", "model", "small", "word", "light")
SUFFIXES = ("##s", "##ing", "##ed", "##er")
FOREIGN = ("strasse", "garten", "kinder", "lachen", "hund")  # made of other pieces: never in the corpus


def _tokenizer() -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer((*WORDS, *SUFFIXES, *FOREIGN, "gar", "##ten"), max_length=64)


def _encoder() -> LoadedModel:
    tokenizer = _tokenizer()
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), max_position_embeddings=64, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-wordpiece", pooling=Pooling(mode="mean", normalize=True))


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [w + s for w in WORDS for s in ("", "s", "ing")]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wordpiece")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(_sentences(60, seed=0)) + "\n")
    original = _encoder()
    work = tmp / "work"
    work.mkdir()
    student = copy.deepcopy(original)
    ctx = PassContext(loaded=student, original=lambda: original, calibration=lambda: pytest.fail("data was given"),
                      work_dir=work)  # fmt: skip
    report = SPEC.apply(ctx, build_config(SPEC, {"data": str(corpus)}))
    save_step_model(report.loaded, tmp / "step", torch.float32, {})
    return original, report, tmp / "step"


def test_wordpiece_trim_keeps_kept_text_identical(trimmed):
    original, report, _ = trimmed
    before, after = original.tokenizer, report.loaded.tokenizer
    assert len(after) < len(before) and report.loaded.model.config.vocab_size == len(after)
    assert report.details["vocab_size"] == [len(before), len(after)]
    fresh = _sentences(20, seed=7)  # new sentences, same words: kept tokens only
    for text in fresh:
        ids = after(text)["input_ids"]
        assert after.convert_ids_to_tokens(ids) == before.convert_ids_to_tokens(before(text)["input_ids"])
    torch.testing.assert_close(embed(report.loaded, fresh), embed(original, fresh), rtol=0, atol=1e-6)


def test_wordpiece_trim_splits_unseen_words_into_kept_pieces(trimmed):
    original, report, _ = trimmed
    after = report.loaded.tokenizer
    for word in FOREIGN:
        assert original.tokenizer.tokenize(word) == [word]
        pieces = after.tokenize(word)
        assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == word
    assert "garten" not in after.get_vocab() and "park" in after.get_vocab()


def test_trimmed_encoder_loads_in_automodel_and_sentence_transformers(trimmed):
    from sentence_transformers import SentenceTransformer

    _, report, step = trimmed
    sentences = _sentences(6, seed=3) + ["a garten strasse."]
    expected = embed(report.loaded, sentences)
    reloaded = kompakt.load(step)
    torch.testing.assert_close(embed(reloaded, sentences), expected, rtol=0, atol=1e-5)
    model = AutoModel.from_pretrained(step)
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(step))
    vocab_lines = (step / "vocab.txt").read_text().splitlines() if (step / "vocab.txt").exists() else None
    if vocab_lines is not None:  # the slow tokenizer's file agrees with tokenizer.json
        assert vocab_lines == sorted(reloaded.tokenizer.get_vocab(), key=reloaded.tokenizer.get_vocab().get)
    st = SentenceTransformer(str(step), device="cpu")
    torch.testing.assert_close(torch.from_numpy(st.encode(sentences)), expected, rtol=0, atol=1e-5)


def test_expected_needs_a_language_model(tmp_path):
    """An encoder predicts no next tokens to rank by: one line saying so."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_sentences(20, seed=0)) + "\n")
    loaded = _encoder()
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None, work_dir=tmp_path)
    with pytest.raises(ConfigError, match="expected needs a language model"):
        SPEC.apply(ctx, build_config(SPEC, {"data": str(corpus), "expected": 10}))
