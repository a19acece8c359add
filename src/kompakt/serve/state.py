"""What every route shares: the server's settings, its model worker and the loaded backend.

Below app.py and completions.py (both read it), above the backend interface, so the routes
and the runner (server.py) import it downward and never each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kompakt.errors import ConfigError, KompaktError
from kompakt.serve.backend import Backend
from kompakt.serve.embedding_schema import MAX_EMBEDDING_TOKENS
from kompakt.serve.limits import ModelWorker, QueueFull, Ticket
from kompakt.serve.openai_schema import APIError

MAX_PROMPT_TOKENS = 16384  # per /v1/completions request, summed over its prompts (prompt tokens x batch)
ENDPOINTS = {"generate": "/v1/chat/completions and /v1/completions", "embed": "/v1/embeddings"}


@dataclass
class ServerSettings:
    """Server-wide limits. api_key None = no authentication (loopback use).

    max_prompt_tokens bounds the work of one /v1/completions request (prompt tokens summed
    over its batch, each scored when logprobs are asked), so one request cannot hold the
    single model worker for minutes while every other client waits. max_embedding_tokens bounds
    one /v1/embeddings request (tokens summed over its inputs, after cutting); its default is
    OpenAI's limit, so indexing tools configured for OpenAI work unchanged, but a request that
    large holds a CPU worker for a minute or more: lower it when many clients share the server.
    """

    api_key: str | None = None
    max_tokens_cap: int = 2048
    queue_size: int = 16
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_embedding_tokens: int = MAX_EMBEDDING_TOKENS

    def validate(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; pass a non-empty key or leave the option out")
        if self.max_tokens_cap < 1:
            raise ConfigError(f"--max-tokens-cap must be at least 1 (got {self.max_tokens_cap})")
        if self.queue_size < 0:
            raise ConfigError(f"--queue-size must be >= 0 (got {self.queue_size})")
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be at least 1 (got {self.max_prompt_tokens})")
        if self.max_embedding_tokens < 1:
            raise ConfigError(f"--max-embedding-tokens must be at least 1 (got {self.max_embedding_tokens})")


@dataclass
class ServerState:
    settings: ServerSettings
    worker: ModelWorker
    backend: Backend | None = None
    error: KompaktError | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    on_load_error: Callable[[], None] | None = None

    def ready_backend(self) -> Backend:
        if self.backend is None:
            message = (
                f"the model failed to load: {self.error}" if self.error else "the model is still loading; retry shortly"
            )
            raise APIError(503, message, type="server_error", code="model_not_ready")
        return self.backend

    def served_backend(self, model: str | None, task: str = "generate") -> Backend:
        """The backend for a request naming `model`: the id /v1/models lists (or no name at
        all); any other name is a 404 model_not_found, as the OpenAI API answers. A model of
        another task (an embedding model asked to chat, a generation model asked for
        embeddings) is a 400 model_not_supported naming the endpoints it serves."""
        backend = self.ready_backend()
        if model is not None and model != backend.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{backend.model_id}' (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        served = getattr(backend, "task", "generate")
        if served != task:
            what = "an embedding model" if served == "embed" else "a text-generation model"
            hint = "" if served == "embed" else "; serve an embedding model for it (e.g. kompakt serve all-minilm-l6-v2)"
            raise APIError(
                400,
                f"'{backend.model_id}' is {what}: it serves {ENDPOINTS[served]} only, not {ENDPOINTS[task]}{hint}",
                param="model",
                code="model_not_supported",
            )
        return backend

    def admit(self) -> Ticket:
        """A place in the model worker's queue, or a 503 queue_full."""
        try:
            return self.worker.admit()
        except QueueFull as full:
            raise APIError(503, str(full), type="server_error", code="queue_full") from None
