"""Vocabulary trimming: keep the tokens a corpus uses, drop the other embedding and head rows.

Ushio et al. 2023, "Efficient Multilingual Language Model Compression through Vocabulary
Trimming": a multilingual model used for one language carries embedding rows for tokens that
never occur; removing them shrinks the model without changing what it computes on that
language. Their trimmer works on SentencePiece Unigram models (mT5, XLM-R), where dropping a
piece changes nothing else. kompakt's models use BPE, where a token is reached through
intermediate tokens, so the kept set is closed under the merges that build each kept token
(kompakt.model.vocab_trim): text made of kept tokens then tokenizes identically (same token
strings, new ids) in transformers and in llama.cpp, and other text still tokenizes, into
smaller pieces (at worst bytes).

Kept: every token the corpus uses at least `min_count` times; with `expected: N`, the N other
tokens the model itself expects most in the corpus's contexts (its next-token probabilities
summed over `expected_positions` corpus tokens: the words of the corpus's language and domain
that a small corpus happens to miss); the merge closure; the byte
tokens; special tokens (`specials: all` keeps every added token flagged special, `named` only
the tokenizer's bos / eos / pad / unk / mask / extra special tokens); the tokens of the chat
template's own text; the ids config.json and generation_config.json name; embedding rows with
no token. The corpus: `data: PATH` (all of it), else the step's calibration blocks.

The result is a standard model (config.vocab_size, tokenizer.json, special token ids all
rewritten) that AutoModelForCausalLM / AutoTokenizer and kompakt's GGUF export read. The step
directory holds `vocab_map.json`: {"old_vocab_size": N, "old_ids": [old id of new id 0, ...]}.
`kompakt eval --reference ORIGINAL` and the per-step evaluation compare the trimmed model with
its original on the original's tokens (kompakt.evaluate.vocab_map).

Sentence encoders (BERT / MiniLM / DistilBERT WordPiece, RoBERTa and ModernBERT BPE): the
corpus is sentences (`data: PATH`, all of its sentences, else the run's training sentences —
its held-out end excluded, so the step's score shows what trimming costs on unseen words),
each tokenized as the encoder reads it (special tokens added, truncated to its
limit); there is no head, only the word-embedding rows go. `compress --target params=` on an
encoder sets `data` to the user's --data. all-MiniLM-L6-v2
keeps 51 % of its parameters in a 30522-token table of which an English corpus of ten thousand
sentences uses about a third. Words outside the corpus are split into smaller kept pieces
(single characters at worst), which moves their embeddings: trim with the text the model will
embed, and read the held-out cosine after the step.

When to use: a model with a large multilingual vocabulary used for one language or domain
(Gemma 3 270M: 63 % of its parameters are the 262k-token embedding). Run it before quantization
steps that put the embedding or head on a grid.

Sample recipe step::

    - prune.vocab: {data: corpus.txt, min_count: 1}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kompakt.errors import ConfigError, DataError
from kompakt.model import vocab_trim
from kompakt.model.loaded import LoadedModel
from kompakt.model.vocab_rows import check_rows_editable, config_token_ids, keep_vocab_rows
from kompakt.passes.base import PassContext, PassReport, PassSpec

logger = logging.getLogger(__name__)

MAP_FILE = "vocab_map.json"
_PROBE_MESSAGES = (
    [{"role": "system", "content": "x"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "x"}],
)


@dataclass
class VocabConfig:
    data: str | None = field(default=None, metadata={"doc": "corpus whose tokens stay (default: the calibration text)"})
    min_count: int = field(default=1, metadata={"doc": "keep a token used at least this many times in the corpus"})
    specials: str = field(
        default="all", metadata={"doc": "added special tokens kept: all, or named (bos/eos/pad/unk/mask/extra)"}
    )
    expected: int = field(default=0, metadata={"doc": "also keep this many tokens the corpus did not use that the model "
                                                      "itself expects most in the corpus's contexts"})  # fmt: skip
    expected_positions: int = field(default=16384, metadata={"doc": "corpus positions whose next-token "
                                                                    "probabilities rank the expected tokens"})  # fmt: skip

    def validate(self) -> None:
        if self.min_count < 1:
            raise ConfigError(f"prune.vocab: min_count must be at least 1, got {self.min_count}")
        if self.expected < 0 or self.expected_positions < 1:
            raise ConfigError(f"prune.vocab: expected must be 0 or more and expected_positions at least 1, got "
                              f"{self.expected} and {self.expected_positions}")  # fmt: skip
        if self.specials not in vocab_trim.SPECIALS:
            raise ConfigError(f"prune.vocab: specials must be one of {', '.join(vocab_trim.SPECIALS)}, got {self.specials!r}")


CORPUS_SENTENCES = 4096  # default sentences asked for when an encoder run has no data


def _sentence_ids(loaded: LoadedModel, sentences: list[str]) -> torch.Tensor:
    """The ids of sentences tokenized as the encoder reads them (special tokens, its limit), flat."""
    from kompakt.model.encode import input_limit

    encoded = loaded.tokenizer(list(sentences), truncation=True, max_length=input_limit(loaded))["input_ids"]
    return torch.tensor([i for row in encoded for i in row], dtype=torch.long)


def _encoder_ids(ctx: PassContext, config: VocabConfig) -> torch.Tensor:
    """An encoder's corpus: `data`, else the run's training sentences, else the calibration sentences."""
    from kompakt.data.sentences import read_sentences

    if config.data is not None:
        return _sentence_ids(ctx.loaded, read_sentences(config.data))
    if ctx.sentences is not None:
        return _sentence_ids(ctx.loaded, ctx.sentences(None, CORPUS_SENTENCES)[0])
    batch = ctx.calibration()  # padded sentences: the real tokens only
    return batch.input_ids[batch.attention_mask.bool()]


def encoder_rows_kept(loaded: LoadedModel, sentences: list[str]) -> int:
    """Word-embedding rows prune.vocab (defaults) keeps on an encoder trimmed to `sentences`: the
    planner's fact for params= targets (kompakt.auto.encoder_plan). Raises what the pass raises."""
    from kompakt.model.arch import arch_for, get_submodule

    data = vocab_trim.tokenizer_json(loaded.tokenizer)
    rows = int(get_submodule(loaded.model, arch_for(loaded.model).embed).weight.shape[0])
    counts = torch.bincount(_sentence_ids(loaded, sentences), minlength=rows)
    return len(kept_ids(loaded, data, counts, VocabConfig())[0])


def corpus_ids(ctx: PassContext, config: VocabConfig, rows: int) -> torch.Tensor:
    """The corpus as ids of this model, flat."""
    if getattr(ctx.loaded, "is_encoder", False):
        ids = _encoder_ids(ctx, config)
    elif config.data is not None:
        from kompakt.data import load_tokens

        ids = load_tokens(config.data, ctx.loaded)
    else:
        ids = ctx.calibration()
    ids = torch.as_tensor(ids).reshape(-1).long()
    if ids.numel() == 0:
        raise DataError("prune.vocab: the corpus is empty; give text with data: PATH")
    if int(ids.max()) >= rows or int(ids.min()) < 0:
        raise DataError(f"prune.vocab: the corpus has ids outside the model's {rows} rows; tokenize it with this model")
    return ids


def template_tokens(tokenizer: Any) -> set[int]:
    """Ids of the chat template's own text (role names, markers, a default system prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    ids: set[int] = set()
    for messages in _PROBE_MESSAGES:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 (jinja raises its own kinds: e.g. "system role not supported")
            continue
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def kept_ids(loaded: LoadedModel, data: dict, counts: torch.Tensor, config: VocabConfig,
             expected: torch.Tensor | None = None) -> tuple[list[int], dict]:  # fmt: skip
    """The sorted old ids to keep, and counts of why (for the step's details); `expected`: the
    model's summed next-token probabilities over the corpus, [rows] (config.expected > 0)."""
    tokenizer, rows = loaded.tokenizer, int(counts.numel())
    vocab = data["model"]["vocab"]
    string_of = {index: token for token, index in vocab.items()}
    string_of.update({entry["id"]: entry["content"] for entry in data.get("added_tokens", [])})
    used = {int(i) for i in torch.nonzero(counts >= config.min_count).reshape(-1).tolist()}
    specials = set(vocab_trim.special_tokens(data, tokenizer.all_special_tokens, config.specials))
    if not {string_of.get(i) for i in used} - specials - {None}:
        raise DataError("prune.vocab: the corpus uses no token besides special tokens; give it text")
    wanted = used | template_tokens(tokenizer) | config_token_ids(loaded.model)
    strings = {string_of[i] for i in wanted if i in string_of} | specials | set(vocab_trim.base_tokens(data))
    closed = vocab_trim.closure(data, strings)
    likely = expected_tokens(expected, string_of, closed, config.expected)  # beyond what is kept already
    if likely:
        closed = vocab_trim.closure(data, closed | likely)
    ids_of = {token: index for index, token in string_of.items()}
    keep = {ids_of[token] for token in closed} | {i for i in wanted if i < rows}
    keep |= {i for i in range(rows) if i not in string_of}  # rows without a token stay, in order
    old_ids = sorted(i for i in keep if i < rows)
    why = {"used": len(used), "expected_added": len(likely), "closure_added": len(closed) - len(strings) - len(likely),
           "special": len(specials),
           "rows_without_token": sum(1 for i in range(rows) if i not in string_of)}  # fmt: skip
    return old_ids, why


def expected_tokens(expected: torch.Tensor | None, string_of: dict[int, str], kept: set[str], count: int) -> set[str]:
    """The `count` tokens outside `kept` with the most expected occurrences."""
    if count == 0 or expected is None:
        return set()
    found: set[str] = set()
    for index in torch.argsort(expected, descending=True).tolist():
        token = string_of.get(index)
        if token is not None and token not in kept:
            found.add(token)
            if len(found) == count:
                break
    return found


def expected_counts(loaded: LoadedModel, ids: torch.Tensor, positions: int, rows: int) -> torch.Tensor:
    """How often the model expects each token in the corpus's contexts: its next-token
    probabilities summed over the first `positions` corpus tokens, windows of 512, [rows].

    A corpus of a few hundred thousand tokens misses many words of its own language and domain;
    the model knows which ones would come next in such text. The probability it puts on removed
    tokens is what trimming costs (it drives the KL on held-out text), so keeping its most
    expected tokens buys the most per row (Gemma 3 270M, WikiText-2: half the held-out KL of
    keeping the tokenizer's earliest merges at the same vocabulary size, bench/prune_vocab.py)."""
    if getattr(loaded, "is_encoder", False):
        raise ConfigError("prune.vocab: expected needs a language model's next-token predictions; an encoder has "
                          "none: leave expected at 0")  # fmt: skip
    from kompakt.evaluate.perplexity import forward_logits, window_prefix

    model, window = loaded.model, 512
    prefix = window_prefix(loaded)  # as the evaluator runs windows: Gemma predicts poorly without <bos>
    device = next(model.parameters()).device
    ids = ids.reshape(-1)[:positions]
    total = torch.zeros(rows, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, ids.numel(), window):
            logits = forward_logits(model, ids[start : start + window][None].to(device), prefix)[0]
            total += torch.softmax(logits.float(), dim=-1).sum(0).double().cpu()[:rows]
    return total


def _gguf_pre(tokenizer: Any, data: dict) -> dict[str, str]:
    """llama.cpp identifies a byte-level pre-tokenizer by hashing ids, which trimming changes:
    record the original's name for the GGUF export (kompakt.export.gguf_tokenizer)."""
    from kompakt.export.gguf_tokenizer import PRE_KEY, recognised_pre

    if data["model"].get("byte_fallback"):
        return {}  # SentencePiece style: exported as llama.cpp's "llama" tokenizer, no pre-tokenizer name
    name = recognised_pre(tokenizer)
    return {PRE_KEY: name} if name else {}


def apply(ctx: PassContext, config: VocabConfig) -> PassReport:
    from kompakt.atomic import write_text
    from kompakt.model.arch import arch_for, get_submodule

    loaded, work = ctx.loaded, ctx.work_dir
    if work is None:
        raise ConfigError("prune.vocab needs the step's work directory to write the tokenizer")
    check_rows_editable(loaded)
    data = vocab_trim.tokenizer_json(loaded.tokenizer)  # refuses what it cannot rewrite, first
    rows = int(get_submodule(loaded.model, arch_for(loaded.model).embed).weight.shape[0])
    ids = corpus_ids(ctx, config, rows)
    counts = torch.bincount(ids, minlength=rows)
    expected = expected_counts(loaded, ids, config.expected_positions, rows) if config.expected else None
    old_ids, why = kept_ids(loaded, data, counts, config, expected)
    tokenizer = vocab_trim.trimmed_tokenizer(loaded.tokenizer, old_ids, work / "tokenizer", _gguf_pre(loaded.tokenizer, data))
    loaded, changes = keep_vocab_rows(loaded, torch.tensor(old_ids, dtype=torch.long))
    loaded.tokenizer = tokenizer
    map_path = work / MAP_FILE
    write_text(map_path, json.dumps({"old_vocab_size": rows, "old_ids": old_ids}))
    corpus = int(counts.sum())
    kept_mask = torch.zeros(rows, dtype=torch.bool)
    kept_mask[old_ids] = True
    outside = int(counts[~kept_mask].sum())
    summary = f"vocabulary {rows} -> {len(old_ids)} tokens ({why['used']} used by {corpus} corpus tokens)"
    logger.info("prune.vocab: %s", summary)
    details = {**changes, **why, "corpus_tokens": corpus, "corpus_tokens_removed": outside,
               "min_count": config.min_count, "specials": config.specials, "expected": config.expected}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary, details=details, files={MAP_FILE: map_path})


PASS = PassSpec(
    name="prune.vocab",
    config=VocabConfig,
    apply=apply,
    needs_calibration=True,
    changes_architecture=True,
    doc=__doc__ or "",
)
