"""A chat conversation with a model: history, reset, and a plain mode for base models.

Terminal chat (and later other front ends) keep only I/O; what is sent to the model and what
is remembered lives here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kompakt.model.loaded import LoadedModel
from kompakt.serve.generate import has_chat_template, stream_generate


@dataclass
class ChatSession:
    """A running conversation.

    With a chat template, history is a list of messages rendered by the template. Without
    one (base models, e.g. Gemma 3 270M) the session is a running transcript: each user line
    is appended and the model continues the text.

    Attributes:
        loaded: the model.
        system: optional system prompt (first message; the transcript's opening text in
            plain mode).
        sampling: keyword arguments for `stream_generate` (max_new_tokens, temperature,
            top_p, seed, stop).
    """

    loaded: LoadedModel
    system: str | None = None
    sampling: dict = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list, init=False)
    transcript: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.reset()

    @property
    def chat_mode(self) -> bool:
        """False when the model has no chat template (plain continuation mode)."""
        return has_chat_template(self.loaded.tokenizer)

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
        else:
            # A newline between turns: the model continues each line the user adds.
            joiner = "\n" if self.transcript and not self.transcript.endswith("\n") else ""
            request = self.transcript + joiner + user_text
        pieces: list[str] = []
        for piece in stream_generate(self.loaded, request, **self.sampling):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        if self.chat_mode:
            self.messages = [*request, {"role": "assistant", "content": reply}]
        else:
            self.transcript = request + reply
