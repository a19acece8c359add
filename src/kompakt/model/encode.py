"""Sentence embeddings from an encoder LoadedModel, as `SentenceTransformer.encode` computes them.

Truncation rule (stated once, used everywhere: eval, serve, export checks, distillation): a
sentence longer than `input_limit(loaded)` tokens — the smaller of the model's
`max_seq_length` (sentence_bert_config.json), its tokenizer's `model_max_length` and its
position table — keeps its first tokens up to that limit, special tokens included.
"""

from __future__ import annotations

import inspect

import torch

from kompakt.errors import KompaktError
from kompakt.model.loaded import LoadedModel
from kompakt.model.sentence import pool


def input_limit(loaded: LoadedModel) -> int:
    """Longest input in tokens (see the module docstring)."""
    if loaded.pooling is None:
        raise KompaktError(f"{loaded.name} is a causal LM, not a sentence encoder; embed with an encoder model")
    limits = [loaded.pooling.max_seq_length, loaded.context_length]
    tokenizer_limit = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits)


def tokenize(loaded: LoadedModel, sentences: list[str]) -> dict[str, torch.Tensor]:
    """Padded, truncated model inputs for `sentences`, restricted to what the model's forward takes
    (DistilBERT and ModernBERT have no token_type_ids)."""
    limit = input_limit(loaded)  # first: a causal LM has no pooling, and is refused in one line
    batch = loaded.tokenizer(loaded.pooling.texts(sentences), padding=True, truncation=True, max_length=limit,
                             return_tensors="pt")  # fmt: skip
    accepted = inspect.signature(loaded.model.forward).parameters
    return {key: value.to(loaded.device) for key, value in batch.items() if key in accepted}


def forward_pooled(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled sentence embeddings [batch, dim] (float32) for tokenized inputs; keeps the graph
    (distillation trains through it)."""
    hidden = loaded.model(**inputs).last_hidden_state
    return pool(hidden, inputs["attention_mask"], loaded.pooling)


@torch.inference_mode()
def embed(loaded: LoadedModel, sentences: list[str], *, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [n, dim] (float32, on CPU) in the order of `sentences`.

    Sentences are batched by length (as sentence-transformers does) so padding stays small.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        return torch.empty(0, loaded.model.config.hidden_size if hasattr(loaded.model.config, "hidden_size") else 0)
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out: list[torch.Tensor | None] = [None] * len(sentences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        vectors = forward_pooled(loaded, tokenize(loaded, [sentences[i] for i in chunk])).cpu()
        for row, index in enumerate(chunk):
            out[index] = vectors[row]
    return torch.stack(out)  # type: ignore[arg-type]
