"""A WordPiece tokenizer (BERT, DistilBERT, MiniLM) as llama.cpp's "bert" (WPM) vocabulary.

llama.cpp's WPM tokenizer stores words in "phantom space" form, as its converter writes them: a
word-initial piece `foo` becomes `▁foo`, a continuation `##bar` becomes `bar`, control tokens
([CLS], [SEP], ...) stay as they are. It splits text the way BERT's BasicTokenizer does
(whitespace, punctuation, CJK characters) after lower-casing and stripping accents, and adds
[CLS] ... [SEP] from add_bos / add_eos (gguf.SpecialVocab reads them and the special ids from
the saved tokenizer). The normaliser's `lowercase` / `strip_accents` are written as
`tokenizer.ggml.normalizer.*` for runtimes that read them; the export check compares how
llama.cpp splits held-out text with the Hugging Face tokenizer, so a cased model that a runtime
lower-cases anyway fails there rather than silently.
"""

from __future__ import annotations

from typing import Any

from kompakt.errors import UnsupportedArchitectureError

PHANTOM_SPACE = "\u2581"
LOWERCASE_KEY = "tokenizer.ggml.normalizer.lowercase"
STRIP_ACCENTS_KEY = "tokenizer.ggml.normalizer.strip_accents"


def wordpiece_tokens(data: dict, tokens: list[str | None], added: dict[int, dict]) -> tuple[list[str], list[int]]:
    """(phantom-space texts, token types) of a WordPiece vocabulary; unused slots become [PADn]."""
    import gguf

    prefix = data["model"].get("continuing_subword_prefix") or "##"
    texts, types = [], []
    for index, text in enumerate(tokens):
        entry = added.get(index)
        if text is None:
            texts.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif entry is not None and entry.get("special"):
            texts.append(text)
            types.append(gguf.TokenType.CONTROL)
        else:
            texts.append(text[len(prefix):] if text.startswith(prefix) else PHANTOM_SPACE + text)
            types.append(gguf.TokenType.USER_DEFINED if entry is not None else gguf.TokenType.NORMAL)
    return texts, types


def normalizer_flags(data: dict) -> dict[str, bool]:
    """{"lowercase", "strip_accents"} of a BertNormalizer (strip_accents None follows lowercase, as
    in tokenizers); refuses a normaliser llama.cpp's WPM tokenizer does not reproduce."""
    normalizer = data.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        raise UnsupportedArchitectureError(
            f"WordPiece tokenizer with a {normalizer.get('type') or 'missing'} normaliser: llama.cpp's bert "
            "tokenizer reproduces BertNormalizer only; export with --format onnx or hf instead"
        )
    lowercase = bool(normalizer.get("lowercase", True))
    strip = normalizer.get("strip_accents")
    return {"lowercase": lowercase, "strip_accents": lowercase if strip is None else bool(strip)}


def add_normalizer(writer: Any, flags: dict[str, bool]) -> None:
    writer.add_bool(LOWERCASE_KEY, flags["lowercase"])
    writer.add_bool(STRIP_ACCENTS_KEY, flags["strip_accents"])
