"""What a tokenizer adds around text, so windows cut from a token stream can be scored right.

Gemma's tokenizer prepends <bos> and Gemma needs it: on WikiText-2, Gemma 3 270M scores
perplexity ~19 with <bos> at the start of each 512-token window and ~53 without. SmolLM2's
tokenizer adds nothing. Code that tokenizes without special tokens and then cuts windows
should start each window with `prefix_ids(tokenizer)`.
"""

from __future__ import annotations


def prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. [bos] for Gemma, [] for SmolLM2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []
