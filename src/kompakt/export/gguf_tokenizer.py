"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), built from a Hugging Face fast tokenizer.

Two kinds of tokenizer.json map onto llama.cpp's tokenizers:

- byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3) -> `tokenizer.ggml.model = "gpt2"`:
  tokens, token types, merges, and `tokenizer.ggml.pre`, the name of llama.cpp's
  pre-tokenizer regex. llama.cpp's converter identifies the pre-tokenizer by encoding a fixed
  text and hashing the ids (`get_vocab_base_pre`); the same hash and table are used here
  (gguf_pretokenizers.py), so SmolLM2 gets "smollm" as in its original GGUF.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3) ->
  `"llama"`: tokens, scores, token types. llama.cpp's SPM tokenizer merges the adjacent pair
  whose result scores highest; SentencePiece BPE scores pieces by -rank, so normal tokens get
  score -id (Gemma 3's own GGUF scores are strictly decreasing with id, the same order),
  byte tokens 0 and special tokens -1000.
- WordPiece (BERT-family encoders) -> `"bert"`, llama.cpp's WPM tokenizer, with tokens in its
  phantom-space form (kompakt.export.gguf_wordpiece).
- Unigram (XLM-R's SentencePiece) -> `"t5"`, llama.cpp's UGM tokenizer (kompakt.export.gguf_unigram).

Special token ids, add_bos/add_eos and the chat template come from gguf.SpecialVocab, which
reads the saved tokenizer files exactly as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from kompakt.errors import UnsupportedArchitectureError
from kompakt.export.gguf_pretokenizers import CHKTXT, PRE_TOKENIZERS

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
PRE_KEY = "kompakt_gguf_pre"  # tokenizer_config.json: see recognised_pre
CLS_KEY = "tokenizer.ggml.cls_token_id"  # read by llama.cpp; gguf-py 0.19 has no constant for it


@dataclass
class GGUFVocab:
    model: str  # "gpt2" | "llama" | "bert" | "t5"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool = False
    special: Any = None  # gguf.SpecialVocab
    add_special: dict[str, bool] = field(default_factory=dict)  # observed add_bos / add_eos
    notes: list[str] = field(default_factory=list)
    normalizer: dict[str, bool] | None = None  # WordPiece: lowercase / strip_accents (gguf_wordpiece)
    cls_id: int | None = None  # written by add_tokenizer: gguf-py 0.19's SpecialVocab has no writer for it
    unigram: dict[str, Any] | None = None  # Unigram: whitespace handling and charsmap (gguf_unigram)


def _tokenizer_json(tokenizer: Any, directory: Path) -> dict:
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedArchitectureError(
            "GGUF export needs a fast tokenizer (tokenizer.json); this tokenizer is a slow one"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _token_list(data: dict, n_vocab: int) -> tuple[list[str | None], dict[int, dict]]:
    vocab = data["model"]["vocab"]
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        raise UnsupportedArchitectureError(
            "GGUF export of Unigram tokenizers is not supported; use a BPE tokenizer model"
        )
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()]) + 1
    tokens: list[str | None] = [None] * max(size, n_vocab)
    for text, index in vocab.items():
        tokens[index] = text
    for index, entry in added.items():
        tokens[index] = entry["content"]
    return tokens, added


def recognised_pre(tokenizer: Any) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or None when not recognised.

    A trimmed vocabulary (prune.vocab) no longer hashes to its original's name (other ids, and
    CHKTXT's rarer tokens removed); the pass records the original's name in tokenizer_config.json
    under PRE_KEY, read here when the hash is unknown.
    """
    ids = tokenizer.encode(CHKTXT)  # default special-token handling, as llama.cpp hashes it
    digest = sha256(str(ids).encode()).hexdigest()
    return PRE_TOKENIZERS.get(digest) or getattr(tokenizer, "init_kwargs", {}).get(PRE_KEY)


def _pre_name(tokenizer: Any) -> tuple[str, str | None]:
    name = recognised_pre(tokenizer)
    if name is None:
        return "default", (
            "pre-tokenizer not recognised (hash not in llama.cpp's table); wrote 'default', "
            "llama.cpp may split text differently from the Hugging Face tokenizer"
        )
    return name, None


def _observed_add_special(tokenizer: Any) -> dict[str, bool]:
    """Whether encode() adds BOS / EOS, so llama.cpp does what the HF tokenizer does."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bool(ids) and bos is not None and ids[0] == bos,
        "eos": bool(ids) and eos is not None and ids[-1] == eos and len(ids) > 1,
    }


def build_vocab(tokenizer: Any, n_vocab: int) -> GGUFVocab:
    """GGUF vocabulary of `tokenizer`, padded with unused tokens to the embedding's n_vocab rows."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="kompakt-tok-") as tmp:
        directory = Path(tmp)
        data = _tokenizer_json(tokenizer, directory)
        model = data["model"]
        if model.get("type") not in ("BPE", "WordPiece", "Unigram"):
            raise UnsupportedArchitectureError(
                f"GGUF export supports BPE, WordPiece and Unigram tokenizers, this one is {model.get('type')!r}"
            )
        if model.get("type") == "Unigram":
            return _unigram_vocab(tokenizer, data, directory, n_vocab)
        tokens, added = _token_list(data, n_vocab)
        special = gguf.SpecialVocab(directory, load_merges=model.get("type") == "BPE", n_vocab=len(tokens))
    cls_id = special.special_token_ids.pop("cls", None)
    vocab = (_wordpiece_vocab if model.get("type") == "WordPiece" else _bpe_vocab)(tokenizer, data, model, tokens,
                                                                                 added, special)  # fmt: skip
    vocab.cls_id = cls_id
    return vocab


def _bpe_vocab(tokenizer: Any, data: dict, model: dict, tokens: list[str | None], added: dict[int, dict],
               special: Any) -> GGUFVocab:  # fmt: skip
    import gguf

    byte_fallback = bool(model.get("byte_fallback"))
    add_special = _observed_add_special(tokenizer)
    types, scores, texts = [], [], []
    for index, text in enumerate(tokens):
        if text is None:
            texts.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        texts.append(text)
        entry = added.get(index)
        if entry is not None:
            types.append(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif byte_fallback and _BYTE_TOKEN.match(text):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(index))
    if byte_fallback:
        prefix = "Prepend" in json.dumps(data.get("normalizer") or {}) or "Metaspace" in json.dumps(
            data.get("pre_tokenizer") or {}
        )
        return GGUFVocab("llama", "default", texts, types, scores, prefix, special, add_special)
    pre, note = _pre_name(tokenizer)
    vocab = GGUFVocab("gpt2", pre, texts, types, None, special=special, add_special=add_special)
    if note:
        vocab.notes.append(note)
    if not special.merges:
        _add_placeholder_merge(vocab, special)
    return vocab


def _wordpiece_vocab(tokenizer: Any, data: dict, model: dict, tokens: list[str | None], added: dict[int, dict],
                     special: Any) -> GGUFVocab:  # fmt: skip
    from kompakt.export.gguf_wordpiece import normalizer_flags, wordpiece_tokens

    flags = normalizer_flags(data)
    texts, types = wordpiece_tokens(data, tokens, added)
    return GGUFVocab("bert", "default", texts, types, special=special, add_special=_observed_add_special(tokenizer),
                     normalizer=flags)  # fmt: skip


def _unigram_vocab(tokenizer: Any, data: dict, directory: Path, n_vocab: int) -> GGUFVocab:
    import gguf

    from kompakt.export.gguf_unigram import unigram_settings, unigram_tokens

    settings = unigram_settings(data)
    texts, types, scores = unigram_tokens(data, n_vocab)
    special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=len(texts))
    vocab = GGUFVocab("t5", "default", texts, types, scores, settings["add_space_prefix"], special,
                      _observed_add_special(tokenizer), unigram=settings)  # fmt: skip
    vocab.cls_id = special.special_token_ids.pop("cls", None)
    return vocab


def _add_placeholder_merge(vocab: GGUFVocab, special: Any) -> None:
    """Give a merge-less byte-level BPE one merge, so GGUF readers accept the vocabulary.

    Readers reject an empty merge list and transformers rejects a merge whose result is not a
    token, so the merge "Ġ Ġ" gets its token "ĠĠ" in the first padding slot. This changes how
    runs of spaces tokenize in the exported file; without a padding slot the export is refused.
    """
    import gguf

    pads = [i for i, t in enumerate(vocab.types) if t == gguf.TokenType.UNUSED]
    if not pads or "\u0120\u0120" in vocab.tokens:
        raise UnsupportedArchitectureError(
            "the tokenizer has no BPE merges and no spare vocabulary slot; GGUF readers need at least one merge"
        )
    vocab.tokens[pads[0]] = "\u0120\u0120"
    vocab.types[pads[0]] = gguf.TokenType.NORMAL
    special.merges = ["\u0120 \u0120"]
    vocab.notes.append("tokenizer has no merges; added the merge 'Ġ Ġ' (double spaces become one token)")


def add_tokenizer(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)
    if vocab.cls_id is not None:
        writer.add_uint32(CLS_KEY, vocab.cls_id)
    if vocab.normalizer is not None:
        from kompakt.export.gguf_wordpiece import add_normalizer

        add_normalizer(writer, vocab.normalizer)
    if vocab.unigram is not None:
        from kompakt.export.gguf_unigram import add_unigram

        add_unigram(writer, vocab.unigram)
    for kind, value in vocab.add_special.items():
        if kind not in vocab.special.add_special_token:
            getattr(writer, f"add_add_{kind}_token")(value)
