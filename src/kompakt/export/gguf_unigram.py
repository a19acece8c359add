"""A Unigram tokenizer (XLM-R's SentencePiece) as llama.cpp's "t5" (UGM) vocabulary.

Multilingual sentence encoders built on XLM-R (paraphrase-multilingual-*, multilingual-e5) use a
SentencePiece Unigram model; llama.cpp runs it as its UGM tokenizer, as its converter writes it
for XLMRobertaModel: every piece with its log-probability score, token types (control for the
specials, unknown for unk_id, user-defined for added non-special tokens), whether a "▁" is put
before the text (the Metaspace pre-tokenizer's prepend scheme), whether runs of spaces collapse
(a Replace of "  {2,}" in the normaliser) and SentencePiece's precompiled normalisation map
(the Precompiled normaliser's charsmap), which llama.cpp applies itself. The export check compares
llama.cpp's split of held-out text with the Hugging Face tokenizer's.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kompakt.errors import UnsupportedArchitectureError


def _normalizers(data: dict) -> list[dict]:
    normalizer = data.get("normalizer") or {}
    return list(normalizer.get("normalizers", [])) if normalizer.get("type") == "Sequence" else [normalizer]


def unigram_settings(data: dict) -> dict[str, Any]:
    """{"add_space_prefix", "remove_extra_whitespaces", "charsmap"} from tokenizer.json."""
    charsmap = b""
    for item in _normalizers(data):
        if item.get("type") == "Precompiled" and item.get("precompiled_charsmap"):
            charsmap = base64.b64decode(item["precompiled_charsmap"])
    collapse = any(item.get("type") == "Replace" and " {2,}" in json.dumps(item.get("pattern", {}))
                   for item in _normalizers(data))  # fmt: skip
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if "Metaspace" not in pre:
        raise UnsupportedArchitectureError(
            "Unigram tokenizer without a Metaspace pre-tokenizer: llama.cpp's UGM tokenizer splits on '▁' only; "
            "export with --format onnx or hf instead"
        )
    prefix = '"prepend_scheme": "never"' not in pre and '"add_prefix_space": false' not in pre
    return {"add_space_prefix": prefix, "remove_extra_whitespaces": collapse, "charsmap": charsmap}


def unigram_tokens(data: dict, n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """(pieces, token types, scores) padded with unused [PADn] pieces to n_vocab rows."""
    import gguf

    model = data["model"]
    pieces = [(str(piece), float(score)) for piece, score in model["vocab"]]
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    size = max(len(pieces), n_vocab, *(index + 1 for index in added))
    texts = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    scores = [-10000.0] * size
    for index, (piece, score) in enumerate(pieces):
        texts[index], types[index], scores[index] = piece, int(gguf.TokenType.NORMAL), score
    for index, entry in added.items():
        texts[index], scores[index] = entry["content"], 0.0
        types[index] = int(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
    unk = model.get("unk_id")
    if unk is not None:
        types[int(unk)] = int(gguf.TokenType.UNKNOWN)
    if len(set(texts)) != len(texts):  # llama.cpp aborts on loading such a vocabulary
        raise UnsupportedArchitectureError("the Unigram vocabulary holds a piece twice; llama.cpp needs unique pieces")
    return texts, types, scores


def add_unigram(writer: Any, settings: dict[str, Any]) -> None:
    writer.add_remove_extra_whitespaces(settings["remove_extra_whitespaces"])
    if settings["charsmap"]:
        writer.add_precompiled_charsmap(settings["charsmap"])
