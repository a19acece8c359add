"""A terminal chat conversation over any Backend (what `kompakt chat --backend llamacpp` uses).

Same interface as kompakt.serve.chat_session.ChatSession (chat_mode, reset, send), so the
terminal front end does not care which engine answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kompakt.serve.backends import Backend, Sampling


@dataclass
class BackendChatSession:
    backend: Backend
    system: str | None = None
    sampling: dict = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.reset()

    @property
    def chat_mode(self) -> bool:
        return True  # a model without a template is rendered as plain "role: content" lines

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply; the exchange joins the history only once the reply is complete."""
        request = [*self.messages, {"role": "user", "content": user_text}]
        ids = self.backend.encode_chat(request)
        options = dict(self.sampling)
        sampling = Sampling(
            max_tokens=options.get("max_new_tokens", 256), temperature=options.get("temperature", 0.7),
            top_p=options.get("top_p", 0.95), seed=options.get("seed"), stop=list(options.get("stop") or []),
        )  # fmt: skip
        pieces: list[str] = []
        for chunk in self.backend.stream(ids, sampling):
            if chunk.text:
                pieces.append(chunk.text)
                yield chunk.text
        self.messages = [*request, {"role": "assistant", "content": "".join(pieces)}]
