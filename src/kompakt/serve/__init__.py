"""Running a model: streaming generation, chat sessions (and later an OpenAI-compatible server)."""

from __future__ import annotations

from kompakt.serve.chat_session import ChatSession
from kompakt.serve.generate import Chunk, generate_text, stream_chunks, stream_generate

__all__ = ["ChatSession", "Chunk", "generate_text", "stream_chunks", "stream_generate"]
