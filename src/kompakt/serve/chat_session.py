"""A chat conversation over any Backend: history, reset, and a plain mode for base models.

The terminal chat (and later other front ends) keep only I/O; what is sent to the model and
what is remembered lives here, the same for transformers and llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kompakt.errors import ConfigError
from kompakt.serve.backend import Backend, Sampling


@dataclass
class ChatSession:
    """A running conversation.

    With a chat template, history is a list of messages rendered by the template. Without
    one (base models, e.g. Gemma 3 270M) the session is a running transcript: each user line
    is appended and the model continues the text.

    Attributes:
        backend: the engine (kompakt.serve.backend_choice.open_backend, or a backend built
            directly, e.g. TransformersBackend(loaded)).
        system: optional system prompt (first message; the transcript's opening text in
            plain mode).
        sampling: max_tokens, temperature, top_p, seed and stop of every reply.
    """

    backend: Backend
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    messages: list[dict[str, str]] = field(default_factory=list, init=False)
    transcript: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if getattr(self.backend, "task", "generate") != "generate":
            raise ConfigError(
                f"{self.backend.model_id} is an embedding model; use kompakt serve for /v1/embeddings"
            )
        self.reset()

    @property
    def chat_mode(self) -> bool:
        """False when the model has no chat template (plain continuation mode)."""
        return self.backend.has_chat_template

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.transcript = self.system or ""

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`; the exchange joins the history once the reply ends.

        A reply abandoned halfway (the consumer stops iterating, e.g. on Ctrl-C) is not
        remembered, so the next turn starts from a consistent history.
        """
        if self.chat_mode:
            request = [*self.messages, {"role": "user", "content": user_text}]
            ids = self.backend.encode_chat(request)
        else:
            # A newline between turns: the model continues each line the user adds.
            joiner = "\n" if self.transcript and not self.transcript.endswith("\n") else ""
            request = self.transcript + joiner + user_text
            ids = self.backend.encode_text(request)
        pieces: list[str] = []
        chunks = self.backend.stream(ids, self.sampling)
        try:
            for chunk in chunks:
                if chunk.text:
                    pieces.append(chunk.text)
                    yield chunk.text
        finally:
            close = getattr(chunks, "close", None)  # Backend.stream promises an Iterator, not a generator
            if close is not None:
                close()  # an abandoned reply stops the engine's token loop now, not at GC
        reply = "".join(pieces)
        if self.chat_mode:
            self.messages = [*request, {"role": "assistant", "content": reply}]
        else:
            self.transcript = request + reply
