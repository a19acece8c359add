"""ChatSession over the Backend interface: history with a chat template, running transcript
without one, reset; the same session runs a .gguf on llama.cpp."""

from __future__ import annotations

import pytest

from kompakt.model.tiny import tiny_model
from kompakt.serve.backend import Sampling
from kompakt.serve.backend_transformers import TransformersBackend
from kompakt.serve.chat_session import ChatSession
from kompakt.serve.generate import generate_text

GREEDY = Sampling(max_tokens=6, temperature=0)
GREEDY_KWARGS = dict(max_new_tokens=6, temperature=0)


def test_history_grows_and_reset_clears():
    loaded = tiny_model("llama")
    session = ChatSession(TransformersBackend(loaded), system="Be brief.", sampling=GREEDY)
    assert session.chat_mode
    reply = "".join(session.send("hello"))
    assert reply == generate_text(
        loaded, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], **GREEDY_KWARGS
    )
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == reply
    "".join(session.send("again"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_abandoned_reply_is_not_remembered_and_stops_the_engine():
    closed = []

    class Watched(TransformersBackend):
        def stream(self, ids, sampling):
            inner = super().stream(ids, sampling)
            try:
                yield from inner
            finally:
                closed.append(True)

    session = ChatSession(Watched(tiny_model("llama")), sampling=Sampling(max_tokens=20, temperature=0))
    stream = session.send("hello")
    next(stream)
    stream.close()
    assert session.messages == [] and closed == [True]


def test_plain_mode_without_chat_template_keeps_a_transcript():
    loaded = tiny_model("gemma3_text")
    loaded.tokenizer.chat_template = None
    session = ChatSession(TransformersBackend(loaded), sampling=GREEDY)
    assert not session.chat_mode
    first = "".join(session.send("Once upon a time"))
    assert first == generate_text(loaded, "Once upon a time", **GREEDY_KWARGS)
    assert session.transcript == "Once upon a time" + first
    "".join(session.send("Then"))
    assert session.transcript.startswith("Once upon a time" + first)
    assert "Then" in session.transcript
    session.reset()
    assert session.transcript == ""


def test_same_session_runs_a_gguf_on_llamacpp(tmp_path):
    pytest.importorskip("llama_cpp")
    from kompakt.export.gguf import export_gguf
    from kompakt.serve.backend_choice import open_backend

    path = export_gguf(tiny_model("llama"), tmp_path / "tiny.gguf", type="f16")
    backend = open_backend(path, "llamacpp")
    try:
        assert backend.kind == "llamacpp" and backend.has_chat_template
        session = ChatSession(backend, system="Be brief.", sampling=GREEDY)
        reply = "".join(session.send("hello"))
        ids = backend.encode_chat(session.messages[:-1])
        expected = "".join(chunk.text for chunk in backend.stream(ids, GREEDY))
        assert reply == expected
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    finally:
        backend.close()
