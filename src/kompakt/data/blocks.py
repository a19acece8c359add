"""Documents -> one token stream -> fixed-length blocks (the BENCH.md calibration protocol).

`tokenize_texts` gives exactly the ids of tokenizing `"\\n\\n".join(texts)` in one call (what
BENCH.md prescribes), but encodes long text in line-aligned chunks when the tokenizer is
verified to tokenize such a split identically: bounded memory, the Rust tokenizer's batch
parallelism, and no "sequence longer than the maximum length" warning.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from kompakt.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SEPARATOR = "\n\n"
_CHUNK_CHARS = 1 << 16  # ~16k tokens per chunk: long enough that boundaries are rare
_CHUNKS_PER_CALL = 64  # chunks per batch call, bounds the tokenizer's per-call memory
_TRUNCATION_MARGIN = 64  # tokens dropped before a cut in the text, where BPE may differ
# Split points, tried in order until one tokenizes the probes exactly like one call. Both cut
# at line starts, never inside words; they differ in where a run of newlines is cut, which
# is where tokenizers differ: Llama-3 / Qwen regexes keep "\n\n" whole before content, the
# GPT-2 regex (SmolLM2) gives the last newline its own token.
_SPLIT_STYLES = (
    re.compile(r"\n(?=\S| \S)"),  # after the newline run
    re.compile(r"(?=\n\S)|\n(?= \S)"),  # before the last newline / after it when a space follows
)
_PROBES = (
    "Hello world.\n\nThe end is near",
    " = Title = \n \n The cat sat . \n",
    "x 12\n\n 34 y\n\t- item\nfoo\n\n\nBar:\n  baz",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nOK",
    "héllo\nwörld 😀\n1.\n2) done",
)
_split_style_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def tokenize_texts(texts: Sequence[str], tokenizer: Any, *, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the documents joined with a blank line, no special tokens added.

    Args:
        texts: documents (as returned by `read_texts`).
        tokenizer: a transformers tokenizer.
        max_tokens: stop once this many tokens are available (the result is the exact prefix
            of the full tokenization); None tokenizes everything.

    Returns:
        LongTensor of shape [n_tokens].
    """
    text = SEPARATOR.join(texts)
    if not text.strip():
        raise DataError("the data holds no text; pass a file with text in it")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
        # Tokenize growing prefixes; tokens far from the cut equal those of the whole text.
        n_chars = max_tokens * 6
        while n_chars < len(text):
            ids = _encode(text[:n_chars], tokenizer)
            if ids.numel() >= max_tokens + _TRUNCATION_MARGIN:
                return ids[:max_tokens]
            n_chars *= 2
    ids = _encode(text, tokenizer)
    return ids if max_tokens is None else ids[:max_tokens]


def _encode(text: str, tokenizer: Any) -> torch.Tensor:
    previous = getattr(tokenizer, "deprecation_warnings", {}).get(_LONG_WARNING)
    if hasattr(tokenizer, "deprecation_warnings"):
        # We never feed the model more than its context; the warning would only confuse.
        tokenizer.deprecation_warnings[_LONG_WARNING] = True
    try:
        style = _split_style(tokenizer) if len(text) > _CHUNK_CHARS else None
        chunks = _split(text, style) if style is not None else [text]
        parts: list[torch.Tensor] = []
        for start in range(0, len(chunks), _CHUNKS_PER_CALL):
            batch = chunks[start : start + _CHUNKS_PER_CALL]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                parts.append(torch.tensor(ids, dtype=torch.long))
    finally:
        if hasattr(tokenizer, "deprecation_warnings"):
            if previous is None:
                tokenizer.deprecation_warnings.pop(_LONG_WARNING, None)
            else:
                tokenizer.deprecation_warnings[_LONG_WARNING] = previous
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _split(text: str, style: re.Pattern) -> list[str]:
    """Cut `text` into pieces of about _CHUNK_CHARS characters at `style`'s split points."""
    chunks: list[str] = []
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        match = style.search(text, start + _CHUNK_CHARS)
        if match is None:
            break
        chunks.append(text[start : match.end()])
        start = match.end()
    chunks.append(text[start:])
    return chunks


def _split_style(tokenizer: Any) -> re.Pattern | None:
    """The split style under which chunked tokenization equals one call (checked on probes).

    None (tokenize in one call) for tokenizers where no style agrees, e.g. SentencePiece
    tokenizers that prepend a space to every call.
    """
    try:
        return _split_style_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    chosen = None
    for style in _SPLIT_STYLES:
        if all(_agrees(probe, style, tokenizer) for probe in _PROBES):
            chosen = style
            break
    logger.debug("tokenizer %s: chunked tokenization at %s", type(tokenizer).__name__,
                 chosen.pattern if chosen else "none (one call)")
    try:
        _split_style_cache[tokenizer] = chosen
    except TypeError:
        pass
    return chosen


def _agrees(probe: str, style: re.Pattern, tokenizer: Any) -> bool:
    cuts = sorted({0, len(probe), *(m.end() for m in style.finditer(probe))})
    pieces = [probe[a:b] for a, b in zip(cuts, cuts[1:])]
    whole = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return whole == [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def _check_length(ids: torch.Tensor, block_len: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(ids.shape)}")
    if block_len < 1:
        raise ConfigError(f"block length must be positive, got {block_len}")
    if ids.numel() < block_len:
        raise DataError(
            f"too little data: one block needs {block_len} tokens, found {ids.numel()}; "
            f"pass more text or a shorter block length"
        )


def sample_blocks(ids: torch.Tensor, n_blocks: int, block_len: int, seed: int = 0) -> torch.Tensor:
    """`n_blocks` blocks of `block_len` tokens at random starts (BENCH.md calibration sampling).

    Starts are `torch.randint(0, len(ids) - block_len, (n_blocks,),
    generator=torch.Generator().manual_seed(seed))`; blocks may overlap.

    Returns:
        LongTensor of shape [n_blocks, block_len].
    """
    _check_length(ids, block_len)
    if n_blocks < 1:
        raise ConfigError(f"number of blocks must be positive, got {n_blocks}")
    ids = ids.long()
    if ids.numel() == block_len:  # randint needs high > low; the only block is the whole stream
        return ids.unsqueeze(0).repeat(n_blocks, 1)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - block_len, (n_blocks,), generator=generator)
    offsets = torch.arange(block_len)
    return ids[starts.unsqueeze(1) + offsets]  # [n_blocks, block_len]


def consecutive_blocks(ids: torch.Tensor, block_len: int) -> torch.Tensor:
    """Non-overlapping consecutive blocks; the tail shorter than a block is dropped.

    Returns:
        LongTensor of shape [len(ids) // block_len, block_len].
    """
    _check_length(ids, block_len)
    n_blocks = ids.numel() // block_len
    return ids[: n_blocks * block_len].long().reshape(n_blocks, block_len)


def split_heldout(ids: torch.Tensor, heldout_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into (train, held-out); the held-out part is the contiguous end.

    Taking it from the end (not random blocks) keeps held-out text unseen by calibration or
    training that reads the start.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"held-out fraction must be between 0 and 1 (exclusive), got {heldout_fraction}")
    n_heldout = max(1, round(ids.numel() * heldout_fraction))
    if ids.numel() - n_heldout < 1:
        raise DataError(f"too little data to hold any out: {ids.numel()} tokens; pass more text")
    return ids[:-n_heldout], ids[-n_heldout:]
