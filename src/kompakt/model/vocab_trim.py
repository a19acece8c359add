"""Vocabulary trimming of a tokenizer: which ids must stay, and tokenizer.json rewritten to them.

Used by `prune.vocab` (Ushio et al. 2023, "Efficient Multilingual Language Model Compression
through Vocabulary Trimming"). The tokens a corpus uses stay; so does everything text made of
those tokens needs to tokenize *identically* (same token strings, ids renumbered):

- the merge closure: every token that a kept token can be built from. A BPE tokenizer reaches a
  token through intermediate tokens, and those intermediates need not occur in any tokenized
  text ("hello" is built from "he" and "llo"). Byte-level BPE (transformers and llama.cpp both
  apply listed merges by rank): both parts of every merge that yields a kept token are kept,
  recursively. SentencePiece-style BPE, which llama.cpp tokenizes by scores over *any* adjacent
  pair whose concatenation is a token: both parts of every split of a kept token into two
  tokens, recursively (a superset of the listed merges). Either way every intermediate of the
  original's steps on kept-token text is kept and the trimmed tokenizer only ever has fewer
  candidate merges, so the original's first choice at each step is still there and still
  first: both take the same steps. (Ushio et al. trim SentencePiece Unigram models, where no
  such closure is needed.)
- the base tokens: the 256 byte-level characters (GPT-2 style) or the 256 `<0xNN>` byte-fallback
  tokens (SentencePiece style), so any text still tokenizes (unkept words fall apart into
  smaller kept pieces, at worst bytes);
- special tokens (added tokens flagged special, or with `specials: named` only those the
  tokenizer names: bos / eos / pad / unk / mask / extra special tokens), the tokens of the chat
  template's own text, the ids config.json / generation_config name (`*_token_id`), and rows
  without a token (padding of the embedding, image placeholders), kept in their order, so
  that a trimmed model and its original can be matched by token strings alone
  (kompakt.evaluate.vocab_map).

WordPiece (BERT, DistilBERT, MiniLM) needs no closure: it tokenizes a word greedily, longest
vocabulary match first (`##` marks a continuation). If the original's pieces of a word are all
kept, at each position its longest match is still in the trimmed vocabulary and nothing longer
is (the trimmed vocabulary is a subset), so the trimmed tokenizer picks the same pieces. The
base tokens are every single-character token and its `##` continuation, so a word of known
characters still tokenizes (into smaller pieces) instead of becoming [UNK] whole.

New ids keep the old order (`old_ids` is sorted), so merge ranks and SentencePiece scores keep
their order too. `rewrite_tokenizer_json` keeps a merge only when both parts and the result
survive; added tokens, post-processor ids and padding ids are renumbered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kompakt.errors import UnsupportedArchitectureError

SPECIALS = ("all", "named")
BYTE_FALLBACK_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def tokenizer_json(tokenizer: Any) -> dict:
    """The tokenizer.json of a fast tokenizer, as a dict; a one-line error for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedArchitectureError(
            f"prune.vocab rewrites fast tokenizers (tokenizer.json); {type(tokenizer).__name__} is not one"
        )
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    kind = model.get("type")
    if kind not in ("BPE", "WordPiece"):
        raise UnsupportedArchitectureError(
            f"prune.vocab rewrites BPE and WordPiece tokenizers; this one is {kind!r} (a {type(tokenizer).__name__})"
        )
    if kind == "WordPiece":
        return data
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UnsupportedArchitectureError(
            "prune.vocab rewrites BPE tokenizers without a continuing-subword prefix or end-of-word suffix; "
            "this one has one"
        )
    return data


def is_byte_level(data: Mapping[str, Any]) -> bool:
    """GPT-2 style: text is mapped to the 256 byte-level characters before BPE."""
    return '"ByteLevel"' in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])


def base_tokens(data: Mapping[str, Any]) -> list[str]:
    """Tokens every text may need: byte-level characters, byte-fallback bytes and the unk token."""
    model = data["model"]
    tokens: list[str] = []
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        tokens.extend(t for t in model["vocab"] if len(t) == 1 or (t.startswith(prefix) and len(t) == len(prefix) + 1))
    if is_byte_level(data):
        from tokenizers.pre_tokenizers import ByteLevel

        tokens.extend(ByteLevel.alphabet())
    if model.get("byte_fallback"):
        tokens.extend(BYTE_FALLBACK_TOKENS)
    if model.get("unk_token"):
        tokens.append(model["unk_token"])
    return [token for token in tokens if token in model["vocab"]]


def special_tokens(data: Mapping[str, Any], named: Iterable[str], specials: str) -> list[str]:
    """Added tokens to keep whatever the corpus says: all flagged special, or only the named ones."""
    named = set(named)
    return [entry["content"] for entry in data.get("added_tokens", [])
            if entry["content"] in named or (specials == "all" and entry.get("special"))]  # fmt: skip


def closure(data: Mapping[str, Any], kept: set[str]) -> set[str]:
    """`kept` closed under what builds its tokens: every two-token split for SentencePiece-style
    BPE (byte fallback; llama.cpp tokenizes it by scores over any pair), the listed merges for
    byte-level BPE (both transformers and llama.cpp apply only listed merges there)."""
    model = data["model"]
    if model.get("type") == "WordPiece":
        return set(kept)  # greedy longest match: a subset tokenizes kept-token text the same (module docstring)
    if model.get("byte_fallback"):
        return split_closure(model["vocab"], kept)
    return merge_closure(model.get("merges", []), model["vocab"], kept)


def split_closure(vocab: Mapping[str, int], kept: set[str]) -> set[str]:
    """`kept` plus, recursively, both parts of every split of a kept token into two tokens."""
    closed, todo = set(kept), list(kept)
    while todo:
        token = todo.pop()
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left not in vocab or right not in vocab:
                continue
            for part in (left, right):
                if part not in closed:
                    closed.add(part)
                    todo.append(part)
    return closed


def merge_closure(merges: Iterable[Any], vocab: Mapping[str, int], kept: set[str]) -> set[str]:
    """`kept` plus, recursively, both parts of every listed merge whose result is kept."""
    parts: dict[str, list[tuple[str, str]]] = {}
    for merge in merges:
        left, right = _merge_pair(merge)
        parts.setdefault(left + right, []).append((left, right))
    closed, todo = set(kept), list(kept)
    while todo:
        for pair in parts.get(todo.pop(), ()):
            for part in pair:
                if part in vocab and part not in closed:
                    closed.add(part)
                    todo.append(part)
    return closed


def _merge_pair(merge: Any) -> tuple[str, str]:
    """A merge as stored in tokenizer.json: ["a", "b"] (current) or "a b" (older files)."""
    if isinstance(merge, str):
        left, _, right = merge.partition(" ")
        return left, right
    return merge[0], merge[1]


def rewrite_tokenizer_json(data: dict, old_ids: list[int]) -> dict:
    """tokenizer.json keeping the tokens `old_ids` (sorted; new id = position), renumbered."""
    new_of = {old: new for new, old in enumerate(old_ids)}
    model = data["model"]
    vocab = {token: new_of[index] for token, index in model["vocab"].items() if index in new_of}
    merges = []
    for merge in model.get("merges", []):
        left, right = _merge_pair(merge)
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    model["vocab"] = vocab
    if "merges" in model:  # BPE only (WordPiece has none)
        model["merges"] = merges
    data["added_tokens"] = [{**entry, "id": new_of[entry["id"]]}
                            for entry in data.get("added_tokens", []) if entry["id"] in new_of]  # fmt: skip
    data["post_processor"] = _renumber_ids(data.get("post_processor"), new_of)
    padding = data.get("padding")
    if isinstance(padding, dict) and padding.get("pad_id") in new_of:
        padding["pad_id"] = new_of[padding["pad_id"]]
    return data


def _renumber_ids(node: Any, new_of: Mapping[int, int]) -> Any:
    """Post-processors name ids: TemplateProcessing special_tokens {"ids": [...]}, Roberta /
    Bert `sep` / `cls` ["</s>", 2]; a Sequence nests them. Renumber every such id."""
    if isinstance(node, list):
        return [_renumber_ids(item, new_of) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list):
            out[key] = [new_of[v] for v in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            out[key] = [value[0], new_of[value[1]]]
        else:
            out[key] = _renumber_ids(value, new_of)
    return out


def renumber_tokenizer_config(config: dict, new_of: Mapping[int, int]) -> dict:
    """tokenizer_config.json: `added_tokens_decoder` is keyed by id (string); the rest names tokens."""
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {str(new_of[int(k)]): v for k, v in decoder.items() if int(k) in new_of}
    return config


def trimmed_tokenizer(tokenizer: Any, old_ids: list[int], directory: Path,
                      extra_config: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
    """The tokenizer keeping `old_ids`, written to `directory` and read back by AutoTokenizer
    (so the result is exactly what transformers loads from a saved model); `extra_config` is
    added to its tokenizer_config.json."""
    from transformers import AutoTokenizer

    from kompakt.atomic import write_text

    data = rewrite_tokenizer_json(tokenizer_json(tokenizer), old_ids)
    tokenizer.save_pretrained(directory)
    write_text(directory / "tokenizer.json", json.dumps(data, ensure_ascii=False))
    vocab_txt = directory / "vocab.txt"  # WordPiece's slow-tokenizer file: must agree with tokenizer.json
    if vocab_txt.is_file():
        tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
        write_text(vocab_txt, "".join(token + "\n" for token in tokens))
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        new_of = {old: new for new, old in enumerate(old_ids)}
        config = renumber_tokenizer_config(json.loads(config_path.read_text(encoding="utf-8")), new_of)
        config.update(extra_config or {})
        write_text(config_path, json.dumps(config, ensure_ascii=False, indent=2))
    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
