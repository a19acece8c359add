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
from kompakt.serve.limits import ModelWorker
from kompakt.serve.openai_schema import APIError

MAX_PROMPT_TOKENS = 16384  # per /v1/completions request, summed over its prompts (prompt tokens x batch)


@dataclass
class ServerSettings:
    """Server-wide limits. api_key None = no authentication (loopback use).

    max_prompt_tokens bounds the work of one /v1/completions request (prompt tokens summed
    over its batch, each scored when logprobs are asked), so one request cannot hold the
    single model worker for minutes while every other client waits.
    """

    api_key: str | None = None
    max_tokens_cap: int = 2048
    queue_size: int = 16
    max_prompt_tokens: int = MAX_PROMPT_TOKENS

    def validate(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; pass a non-empty key or leave the option out")
        if self.max_tokens_cap < 1:
            raise ConfigError(f"--max-tokens-cap must be at least 1 (got {self.max_tokens_cap})")
        if self.queue_size < 0:
            raise ConfigError(f"--queue-size must be >= 0 (got {self.queue_size})")
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be at least 1 (got {self.max_prompt_tokens})")


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

    def served_backend(self, model: str | None) -> Backend:
        """The backend for a request naming `model`: the id /v1/models lists (or no name at
        all); any other name is a 404 model_not_found, as the OpenAI API answers."""
        backend = self.ready_backend()
        if model is not None and model != backend.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{backend.model_id}' (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        return backend
