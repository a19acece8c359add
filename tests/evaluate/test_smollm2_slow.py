"""The embedded SmolLM2 on WikiText-2 (BENCH.md protocol): the perplexity BENCH.md records."""

from __future__ import annotations

import pytest
import torch

from kompakt.evaluate import perplexity


@pytest.mark.slow
def test_smollm2_wikitext2_16k(wikitext_test):
    load = pytest.importorskip("kompakt.model.load").load
    loaded = load(None)
    text = wikitext_test.read_text(encoding="utf-8")
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    result = perplexity(loaded, ids, window=512, stride=512, max_tokens=16384)
    assert result.tokens_scored == 32 * 511
    assert result.ppl == pytest.approx(28.14, abs=0.01)  # BENCH.md's anchor for the original on this protocol
