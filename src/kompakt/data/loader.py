"""`load_tokens`: the one entry the rest of kompakt uses to get calibration / training tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kompakt.data.blocks import tokenize_texts
from kompakt.data.generated import generate_texts
from kompakt.data.sources import read_texts

logger = logging.getLogger(__name__)

# 128 blocks of 512 tokens: the BENCH.md calibration size.
DEFAULT_GENERATED_TOKENS = 128 * 512
# Self-generated calibration text is sampled from the original on the CPU; beyond this many
# tokens the blocks overlap instead (generation is the slow part, and it is cached).
MAX_GENERATED_CALIBRATION_TOKENS = 32768
# Names that ask for self-generated text explicitly (e.g. `data: generated` in a recipe).
GENERATED_SOURCES = frozenset({"generated", "self", "self-generated"})


def load_tokens(
    source: str | Path | Sequence[str | Path] | None,
    loaded: Any,
    *,
    n_tokens: int | None = None,
    seed: int = 0,
    text_field: str = "text",
) -> torch.Tensor:
    """Tokens of the user's data, or text the model generates itself when `source` is None.

    Args:
        source: a data path (or list of paths) as `read_texts` accepts; None or "generated"
            samples text from `loaded` (cached on disk).
        loaded: the LoadedModel whose tokenizer (and, for generated data, model) is used.
        n_tokens: keep the first `n_tokens` tokens of user data (all when None); for generated
            data, how many to generate (default DEFAULT_GENERATED_TOKENS).
        seed: seed of generated data.
        text_field: field / column holding plain text in jsonl, parquet and datasets.

    Returns:
        LongTensor of shape [n_tokens] (fewer when the user's data is shorter).
    """
    tokenizer = loaded.tokenizer
    if source is None or (isinstance(source, str) and source in GENERATED_SOURCES and not Path(source).exists()):
        wanted = n_tokens or DEFAULT_GENERATED_TOKENS
        texts = generate_texts(loaded, wanted, seed=seed)
        return tokenize_texts(texts, tokenizer, max_tokens=wanted)
    texts = read_texts(source, tokenizer=tokenizer, text_field=text_field)
    ids = tokenize_texts(texts, tokenizer, max_tokens=n_tokens)
    if n_tokens is not None and ids.numel() < n_tokens:
        logger.warning("the data holds %d tokens, fewer than the %d asked for", ids.numel(), n_tokens)
    return ids
