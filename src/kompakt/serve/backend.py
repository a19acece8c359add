"""The Backend interface: what the server and the chat session call, what each engine implements.

    ids = backend.encode_chat([{"role": "user", "content": "hi"}])
    for chunk in backend.stream(ids, Sampling(max_tokens=64)): ...

A backend works on token ids: the server counts them (context check, usage, the scoring
cap) before the model runs, and lm-evaluation-harness sends prompts already tokenized.
Every method is called from one thread at a time (kompakt.serve.limits.ModelWorker).
This module sits at the bottom of kompakt.serve (no torch, no engine) so both engines,
the chat session and the server import it downward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kompakt.errors import ConfigError

Messages = Sequence[Mapping[str, str]]

SCORE_CHUNK_TOKENS = 256  # positions scored per step: memory is chunk x vocab, not prompt x vocab


@dataclass(frozen=True)
class Sampling:
    """Generation parameters as the OpenAI API names them (temperature 0 = greedy).

    logit_bias: token id -> value added to that token's logit before sampling (OpenAI's
    logit_bias; -100 bans a token, 100 all but forces it).
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """One step of a generation stream.

    Attributes:
        text: decoded text that became final with this step (may be empty while a multi-byte
            character or a possible stop string is still incomplete).
        token_id: the token sampled at this step; None for the closing chunk.
        finish_reason: None while running; "stop" (EOS or a stop string) or "length"
            (max_new_tokens or the context was reached) on the closing chunk.
    """

    text: str
    token_id: int | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of a sequence, as /v1/completions `logprobs` reports them.

    Attributes:
        tokens: each token as text.
        logprobs: log p(token | everything before it); None for the first token.
        top: the `top_n` most likely tokens at each position (None for the first).
    """

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


class InputTooLong(ConfigError):
    """An input over the model's token limit (the server answers 400 context_length_exceeded)."""


class Backend(Protocol):
    kind: str  # "transformers" | "llamacpp"
    task: str  # "generate" (chat, completions) | "embed" (embeddings: kompakt.serve.backend_embeddings)
    model_id: str  # the name /v1/models reports and requests must use
    context_length: int
    vocab_size: int
    has_chat_template: bool  # False: chat renders plain "role: content" lines

    def encode_text(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: Messages) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[Chunk]: ...
    def score(self, ids: list[int], top_n: int) -> TokenScores: ...
    def close(self) -> None: ...


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ConfigError for sampling parameters out of range."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (got {temperature}); use 0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (got {top_p})")


def tokenize_within(tokenizer, texts: Sequence[str], limit: int, truncate: bool) -> list[list[int]]:
    """Token ids of each text with a Hugging Face tokenizer's special tokens, cut to `limit` by the
    tokenizer's own truncation (what embed() feeds an encoder).

    Raises:
        InputTooLong: a text over the limit when `truncate` is False (names its index).
    """
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    out = []
    for index, ids in enumerate(full):
        if len(ids) > limit:
            if not truncate:
                raise InputTooLong(
                    f"input[{index}] has {len(ids)} tokens; this model embeds at most {limit}. "
                    "Shorten it, or send truncate: true to embed its first tokens"
                )
            ids = tokenizer(texts[index], add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        out.append(list(ids))
    return out


def check_embedding_ids(ids: Sequence[int], vocab_size: int, limit: int, field_name: str) -> None:
    """Token ids a client sent for embedding: inside the vocabulary and within the limit (never cut)."""
    check_token_ids(ids, vocab_size, field_name)
    if len(ids) > limit:
        raise InputTooLong(f"{field_name} has {len(ids)} tokens; this model embeds at most {limit}; send fewer")


def check_token_ids(ids: Sequence[int], vocab_size: int, field_name: str) -> None:
    """Raise ConfigError naming `field_name` and the valid range for an id outside the vocabulary."""
    bad = next((token for token in ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise ConfigError(
            f"{field_name}: token id {bad} is outside the vocabulary; valid ids are 0..{vocab_size - 1}"
        )
