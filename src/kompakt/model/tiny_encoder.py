"""Tiny random sentence encoders of every supported encoder family, built in code (tests, docs).

BERT and DistilBERT get a tiny uncased WordPiece tokenizer (single characters plus their "##"
continuations, so any ASCII text tokenizes, and llama.cpp's WPM tokenizer can be tested);
RoBERTa, XLM-R and ModernBERT get a byte-level BPE tokenizer with <s> / </s> specials. All use
mean pooling with normalisation, as all-MiniLM-L6-v2 does.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from kompakt.model.loaded import LoadedModel
from kompakt.model.progress import quiet_third_party
from kompakt.model.sentence import Pooling

TINY_ENCODERS = ("bert", "distilbert", "roberta", "xlm-roberta", "modernbert")
_POSITIONS = 128
_WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BYTE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's order: cls 0, pad 1, sep 2
_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)


def wordpiece_tokenizer(extra: Iterable[str] = (), max_length: int = _POSITIONS) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer over single characters (any text tokenizes), plus `extra`
    whole-word and ``##`` pieces (tests that need words in the vocabulary)."""
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = dict.fromkeys((*_WORDPIECE_SPECIALS, *pieces, *(f"##{p}" for p in pieces), *extra))
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]", model_max_length=max_length)  # fmt: skip


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(_BYTE_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   model_max_length=_POSITIONS)  # fmt: skip


def _config(family: str, vocab_size: int):
    if family == "distilbert":
        return AutoConfig.for_model(family, vocab_size=vocab_size, dim=64, hidden_dim=128, n_layers=4, n_heads=4,
                                    max_position_embeddings=_POSITIONS, pad_token_id=0)  # fmt: skip
    if family == "bert":
        return AutoConfig.for_model(family, vocab_size=vocab_size, max_position_embeddings=_POSITIONS, **_SIZES)
    if family == "modernbert":
        return AutoConfig.for_model(family, vocab_size=vocab_size, max_position_embeddings=_POSITIONS,
                                    pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2,
                                    global_attn_every_n_layers=2, local_attention=32, **_SIZES)  # fmt: skip
    # RoBERTa / XLM-R number positions from padding_idx + 1, so the table holds two more rows.
    return AutoConfig.for_model(family, vocab_size=vocab_size, max_position_embeddings=_POSITIONS + 2,
                                pad_token_id=1, bos_token_id=0, eos_token_id=2, **_SIZES)  # fmt: skip


def tiny_encoder(family: str = "bert", seed: int = 0) -> LoadedModel:
    """A randomly initialised tiny encoder of `family`, fp32, eval mode, with tokenizer and pooling."""
    if family not in TINY_ENCODERS:
        raise ValueError(f"no tiny encoder for {family!r}; choose one of {', '.join(TINY_ENCODERS)}")
    tokenizer = wordpiece_tokenizer() if family in ("bert", "distilbert") else _byte_tokenizer()
    if family == "distilbert":
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    config = _config(family, vocab_size=-(-len(tokenizer) // 16) * 16)
    torch.manual_seed(seed)
    with quiet_third_party():
        model = AutoModel.from_config(config, dtype=torch.float32)
    model.eval()
    pooling = Pooling(mode="mean", normalize=True, max_seq_length=_POSITIONS)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{family}", pooling=pooling)


def save_tiny_encoder(family: str, directory, seed: int = 0) -> LoadedModel:
    """Build a tiny encoder and save it as a sentence-transformers directory (kompakt's save_model)."""
    from kompakt.model.save import save_model

    loaded = tiny_encoder(family, seed=seed)
    save_model(loaded, directory)
    return loaded
