"""Evaluation across vocabularies (kompakt.evaluate.vocab_map): a trimmed model against its original."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import kompakt
from kompakt.errors import ConfigError
from kompakt.evaluate.fidelity import fidelity
from kompakt.evaluate.fidelity_mapped import fidelity_across
from kompakt.evaluate.vocab_map import VocabMap, vocab_map
from kompakt.passes.base import PassContext, build_config, get_pass

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from vocab_tokenizers import ENGLISH, OTHER, byte_fallback_tokenizer, byte_level_tokenizer, corpus, model_with  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOW = 32


def _ids(tokenizer, texts) -> torch.Tensor:
    return torch.tensor(tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(original, trimmed) Gemma-layout tiny models with a SentencePiece-style tokenizer (<bos> prefix)."""
    original = model_with(byte_fallback_tokenizer(), "gemma3_text", seed=1)
    spec = get_pass("prune.vocab")
    ids = _ids(original.tokenizer, corpus())
    ctx = PassContext(loaded=copy.deepcopy(original), original=lambda: original,
                      calibration=lambda: ids.reshape(1, -1), work_dir=tmp_path_factory.mktemp("work"))  # fmt: skip
    return original, spec.apply(ctx, build_config(spec, {})).loaded


def test_identity_map_gives_todays_kl():
    reference = model_with(byte_level_tokenizer(), "llama", seed=0)
    candidate = model_with(byte_level_tokenizer(), "llama", seed=1)
    ids = _ids(reference.tokenizer, corpus(n=40))
    rows = reference.model.get_output_embeddings().weight.shape[0]
    identity = VocabMap(torch.arange(rows), rows, {}, candidate.tokenizer)
    plain = fidelity(reference, candidate, ids, window=WINDOW)
    mapped = fidelity_across(reference, candidate, ids, identity, window=WINDOW)
    assert mapped.tokens == plain.tokens and mapped.positions_removed == 0 and mapped.removed_mass < 1e-6
    for name in ("kl_mean", "kl_p99", "top1", "ppl_reference", "ppl_candidate"):
        assert getattr(mapped, name) == pytest.approx(getattr(plain, name), rel=1e-4, abs=1e-6), name


def test_kept_text_has_no_divergence(pair):
    original, trimmed = pair
    ids = _ids(original.tokenizer, corpus(seed=4, n=30))  # new sentences of kept tokens
    result = kompakt.evaluate(trimmed, reference=original, ids=ids, window=WINDOW, speed=False)
    assert result.kl_mean < 1e-5 and result.top1 == 1.0
    assert result.extra.get("positions_removed", 0) == 0


def test_removed_tokens_are_counted_and_cost_kl(pair):
    original, trimmed = pair
    ids = _ids(original.tokenizer, corpus(words=ENGLISH + OTHER, seed=5, n=30))
    vmap = vocab_map(original, trimmed)
    removed = vmap.new_of[ids] < 0
    result = kompakt.evaluate(trimmed, reference=original, ids=ids, window=WINDOW, speed=False)
    scored = torch.ones_like(removed)
    scored[:: WINDOW] = False  # each window's first token is context only
    assert result.extra["positions_removed"] == int((removed & scored).sum()) > 0
    assert result.tokens_scored + result.extra["positions_removed"] == int(scored.sum())
    assert result.kl_mean > 0 and 0 < result.extra["removed_mass"] < 1
    pieces, start = vmap.translate(ids)
    assert trimmed.tokenizer.decode(pieces) == original.tokenizer.decode(ids)  # the candidate reads the same text


def test_unrelated_vocabularies_are_refused():
    reference = model_with(byte_fallback_tokenizer(), "llama")
    candidate = model_with(byte_level_tokenizer(), "llama")
    with pytest.raises(ConfigError, match="not a trimmed reference vocabulary"):
        vocab_map(reference, candidate)


def test_run_measurement_of_a_trimmed_step(pair, tmp_path):
    from kompakt.recipe.rundata import Measurer, RunData
    from kompakt.recipe.schema import DataSpec

    original, trimmed = pair
    path = tmp_path / "text.txt"
    path.write_text("\n".join(corpus(words=ENGLISH + OTHER[:2], seed=6, n=60)))
    spec = DataSpec(calibration=str(path), calibration_blocks=2, block_len=32, eval_tokens=256, window=WINDOW, stride=WINDOW)
    data = RunData(spec, original, 0)
    full = Measurer(original, data, ["ppl", "kl", "top1"]).measure(trimmed)
    assert full["kl_mean"] > 0 and full["positions_removed"] > 0 and "kl_top_k" not in full
    assert Measurer(original, data, ["ppl"]).measure(trimmed)["ppl"] > 1  # reads the text in its own tokens


def test_cli_eval_of_a_trimmed_directory(pair, tmp_path, cli):
    from kompakt.model.save import save_model

    original, trimmed = pair
    save_model(original, tmp_path / "original")
    save_model(trimmed, tmp_path / "trimmed")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(corpus(words=ENGLISH + OTHER[:2], seed=8, n=20)))
    code, out, err = cli(["eval", str(tmp_path / "trimmed"), "--reference", str(tmp_path / "original"),
                          "--data", str(text), "--window", str(WINDOW), "--no-speed"])  # fmt: skip
    assert code == 0, err
    assert "next tokens it lacks" in out and "KL mean" in out
