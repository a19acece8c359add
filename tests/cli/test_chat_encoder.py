"""`kompakt chat` on a sentence-embedding model: one line naming what to use instead, exit 2."""

from __future__ import annotations

import pytest

from kompakt.errors import ConfigError
from kompakt.model.tiny import save_tiny_encoder, tiny_encoder


def test_chat_on_an_encoder_exits_2_in_one_line(tmp_path, cli):
    save_tiny_encoder("bert", tmp_path / "enc")
    code, out, err = cli(["chat", str(tmp_path / "enc")])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "is an embedding model; use kompakt serve for /v1/embeddings" in err


def test_chat_session_refuses_an_embedding_backend():
    from kompakt.serve.backend_embeddings import EmbeddingBackend
    from kompakt.serve.chat_session import ChatSession

    with pytest.raises(ConfigError, match="embedding model"):
        ChatSession(EmbeddingBackend(tiny_encoder("distilbert")))
