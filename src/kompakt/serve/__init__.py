"""Running a model: streaming generation, chat sessions over a Backend, an OpenAI-compatible server.

Names are imported lazily (as in kompakt/__init__.py): `import kompakt.serve.state` for the
CLI's defaults must not pay for torch and transformers.
"""

from __future__ import annotations

from kompakt.lazy_api import lazy_getattr

_API = {
    "ChatSession": "kompakt.serve.chat_session",
    "Chunk": "kompakt.serve.backend",
    "generate_text": "kompakt.serve.generate",
    "stream_chunks": "kompakt.serve.generate",
    "stream_generate": "kompakt.serve.generate",
}
__all__ = sorted(_API)

__getattr__ = lazy_getattr(__name__, _API)
