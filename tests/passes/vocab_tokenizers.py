"""Small real BPE tokenizers, trained in code in milliseconds, for vocabulary-trimming tests.

The tiny models' own tokenizer (kompakt.model.tiny) is bytes only, with nothing to trim. These
have merges, as the embedded models do: `byte_level_tokenizer` is GPT-2 style (SmolLM2, Qwen),
`byte_fallback_tokenizer` SentencePiece style with byte fallback (Gemma 3: spaces become "▁",
<0xNN> byte tokens, <bos> put before text).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import CHATML_TEMPLATE, tiny_model

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>", "<unused0>", "<unused1>")
ENGLISH = ("the cat sat on the mat and the dog ran to the park while birds sang in the morning light "
           "people walked along the river talking about weather music books and their families").split()  # fmt: skip
OTHER = "der hund läuft schnell über die straße während kinder spielen und lachen im garten".split()


def corpus(words=ENGLISH, n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(n)]


def _fast(core: Tokenizer, bos: bool) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", model_max_length=512)  # fmt: skip
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tokenizer.convert_tokens_to_ids("<bos>"))]
        )
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                            pad_token="<pad>", unk_token="<unk>", model_max_length=512)  # fmt: skip
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def byte_level_tokenizer(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(corpus(ENGLISH + OTHER, seed=1), trainer)
    return _fast(core, bos=False)


def byte_fallback_tokenizer(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """Gemma's layout: specials, then <0x00>..<0xFF>, then pieces; merges trained on "▁"-words."""
    trainer_core = Tokenizer(models.BPE())
    trainer_core.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS) - 256, show_progress=False)
    trainer_core.train_from_iterator(corpus(ENGLISH + OTHER, seed=1), trainer)
    trained = trainer_core.to_str()
    import json

    model = json.loads(trained)["model"]
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    core.add_special_tokens(list(SPECIALS))
    return _fast(core, bos=True)


def model_with(tokenizer: PreTrainedTokenizerFast, family: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny model of `family` sized to `tokenizer` (one row per token), with its special ids."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos_token_id", "<bos>"), ("eos_token_id", "<eos>"), ("pad_token_id", "<pad>"))}  # fmt: skip
    loaded = tiny_model(family, seed=seed, vocab_size=len(tokenizer), **ids)
    loaded.tokenizer = tokenizer
    return loaded
