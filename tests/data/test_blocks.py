"""tokenize_texts (chunked == one call), sample_blocks (== the BENCH.md formula), splits, errors."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kompakt.data import blocks, consecutive_blocks, sample_blocks, split_heldout, tokenize_texts
from kompakt.errors import DataError
from kompakt.model.tiny import tiny_tokenizer

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MERGES = [("Ċ", "Ċ"), ("Ġ", "T"), ("Ġ", "="), ("Ġ", "Ċ"), (".", "Ċ"), ("Ċ", "Ġ")]
TEXT = "\n\n".join(
    f" = Section {i} = \n \n Line one of {i}.\nLine two\n\n\nTail:\n  item {i}\n\tx.\n\nThe end {i}"
    for i in range(40)
)


def _bpe_tokenizer(pre_tokenizer) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a few whitespace merges, behind the given pre-tokenizer."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    core.pre_tokenizer = pre_tokenizer
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=64)


TOKENIZERS = {
    "bytes": (tiny_tokenizer, 0),
    "gpt2": (lambda: _bpe_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)), 1),
    "llama3": (
        lambda: _bpe_tokenizer(
            pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        ),
        0,
    ),
    "prefix-space": (lambda: _bpe_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True)), None),
}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_chunked_tokenization_equals_one_call(name, monkeypatch, caplog):
    make, style_index = TOKENIZERS[name]
    tokenizer = make()
    monkeypatch.setattr(blocks, "_CHUNK_CHARS", 100)
    style = blocks._split_style(tokenizer)
    assert style is (None if style_index is None else blocks._SPLIT_STYLES[style_index])
    texts = [TEXT[:2000], TEXT[2000:]]
    with caplog.at_level("WARNING"):
        ids = tokenize_texts(texts, tokenizer)
    assert "longer than the specified maximum" not in caplog.text
    expected = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == expected
    assert tokenize_texts(texts, tokenizer, max_tokens=500).tolist() == expected[:500]


def test_tokenize_no_special_tokens_and_empty():
    tokenizer = tiny_tokenizer()
    assert tokenize_texts(["ab", "c"], tokenizer).tolist() == tokenizer("ab\n\nc", add_special_tokens=False).input_ids
    with pytest.raises(DataError, match="no text"):
        tokenize_texts(["", "  "], tokenizer)


def test_sample_blocks_matches_bench_formula():
    ids = torch.arange(1000) * 3
    got = sample_blocks(ids, 16, 64, seed=5)
    starts = torch.randint(0, len(ids) - 64, (16,), generator=torch.Generator().manual_seed(5))
    expected = torch.stack([ids[s : s + 64] for s in starts])
    assert got.shape == (16, 64) and got.dtype == torch.long
    assert torch.equal(got, expected)
    assert torch.equal(sample_blocks(ids, 16, 64, seed=5), got)
    assert not torch.equal(sample_blocks(ids, 16, 64, seed=6), got)


def test_sample_blocks_default_seed_and_exact_length():
    ids = torch.arange(600)
    starts = torch.randint(0, 600 - 512, (4,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_blocks(ids, 4, 512)[:, 0], starts)
    assert torch.equal(sample_blocks(ids[:512], 2, 512), ids[:512].repeat(2, 1))


def test_too_short_says_needed_and_found():
    with pytest.raises(DataError, match="needs 512 tokens, found 100"):
        sample_blocks(torch.arange(100), 4, 512)
    with pytest.raises(DataError, match="needs 512 tokens, found 100"):
        consecutive_blocks(torch.arange(100), 512)


def test_consecutive_blocks():
    blocks_ = consecutive_blocks(torch.arange(10), 3)
    assert blocks_.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_split_heldout_takes_contiguous_end():
    train, heldout = split_heldout(torch.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and heldout.tolist() == list(range(90, 100))
    train, heldout = split_heldout(torch.arange(5), 0.01)
    assert heldout.tolist() == [4]
    with pytest.raises(DataError):
        split_heldout(torch.arange(1), 0.5)
