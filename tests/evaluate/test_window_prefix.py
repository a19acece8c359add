"""Windows start with what the tokenizer puts before text (<bos> for Gemma), unscored."""

from __future__ import annotations

import math

import torch

from kompakt.evaluate import fidelity, perplexity
from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import tiny_model, tiny_tokenizer


class BosTokenizer:
    """The tiny tokenizer, but adding <s> (id 0) in front of text like Gemma's adds <bos>."""

    def __init__(self):
        self.inner = tiny_tokenizer()

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_perplexity_runs_bos_before_each_window_without_scoring_it():
    plain = tiny_model("gemma3_text", seed=3)
    with_bos = LoadedModel(model=plain.model, tokenizer=BosTokenizer(), name="bos")
    ids = torch.randint(5, 200, (64,), generator=torch.Generator().manual_seed(0))
    result = perplexity(with_bos, ids, window=32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in (0, 32):
            window = torch.cat([torch.tensor([0]), ids[start : start + 32]]).unsqueeze(0)
            log_probs = torch.log_softmax(plain.model(window).logits[0, 1:-1].float(), dim=-1)
            nll -= log_probs.gather(-1, window[0, 2:].unsqueeze(-1)).sum().item()
            count += 31
    assert result.tokens_scored == count
    assert math.isclose(result.ppl, math.exp(nll / count), rel_tol=1e-5)
    assert not math.isclose(result.ppl, perplexity(plain, ids, window=32).ppl, rel_tol=1e-3)


def test_fidelity_of_a_model_with_itself_is_exact_with_prefix():
    loaded = tiny_model("llama", seed=1)
    with_bos = LoadedModel(model=loaded.model, tokenizer=BosTokenizer(), name="bos")
    ids = torch.randint(5, 200, (64,), generator=torch.Generator().manual_seed(1))
    result = fidelity(with_bos, with_bos, ids, window=32)
    assert result.kl_mean < 1e-6 and result.top1 == 1.0
