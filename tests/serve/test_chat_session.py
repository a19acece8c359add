"""ChatSession: history with a chat template, running transcript without one, reset."""

from __future__ import annotations

from kompakt.model.tiny import tiny_model
from kompakt.serve.chat_session import ChatSession
from kompakt.serve.generate import generate_text

GREEDY = dict(max_new_tokens=6, temperature=0)


def test_history_grows_and_reset_clears():
    loaded = tiny_model("llama")
    session = ChatSession(loaded, system="Be brief.", sampling=GREEDY)
    assert session.chat_mode
    reply = "".join(session.send("hello"))
    assert reply == generate_text(
        loaded, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], **GREEDY
    )
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == reply
    "".join(session.send("again"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_abandoned_reply_is_not_remembered():
    session = ChatSession(tiny_model("llama"), sampling=dict(max_new_tokens=20, temperature=0))
    stream = session.send("hello")
    next(stream)
    stream.close()
    assert session.messages == []


def test_plain_mode_without_chat_template_keeps_a_transcript():
    loaded = tiny_model("gemma3_text")
    loaded.tokenizer.chat_template = None
    session = ChatSession(loaded, sampling=GREEDY)
    assert not session.chat_mode
    first = "".join(session.send("Once upon a time"))
    assert first == generate_text(loaded, "Once upon a time", **GREEDY)
    assert session.transcript == "Once upon a time" + first
    "".join(session.send("Then"))
    assert session.transcript.startswith("Once upon a time" + first)
    assert "Then" in session.transcript
    session.reset()
    assert session.transcript == ""
