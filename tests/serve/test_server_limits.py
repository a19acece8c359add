"""What one request may cost the server: the body is refused while it is read (413), the
prompt tokens of a /v1/completions batch are capped (400), scoring holds chunk x vocab logits."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import MODEL, running_server, tiny_backend  # noqa: E402

from kompakt.serve.openai_schema import MAX_BODY_BYTES  # noqa: E402
from kompakt.serve.server import create_app  # noqa: E402

PIECE = 64 * 1024


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("serve-limits"))


def _post_in_process(app, content, headers=None) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", content=content, headers=headers)

    return asyncio.run(post())


def test_chunked_body_over_the_limit_is_refused_while_reading(backend):
    sent = 0

    async def body():  # no Content-Length: httpx sends it chunked
        nonlocal sent
        for _ in range(4 * MAX_BODY_BYTES // PIECE):
            sent += PIECE
            yield b" " * PIECE

    response = _post_in_process(create_app(backend), body())
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "8 MiB" in error["message"]
    # The server stopped pulling the body one piece past the limit, not at its end (32 MiB).
    assert MAX_BODY_BYTES < sent <= MAX_BODY_BYTES + PIECE


def test_declared_length_over_the_limit_is_refused_before_reading(backend):
    pulled = 0

    async def body():
        nonlocal pulled
        for _ in range(2):
            pulled += 1
            yield b" " * PIECE

    headers = {"Content-Length": str(MAX_BODY_BYTES + 1)}
    response = _post_in_process(create_app(backend), body(), headers)
    assert response.status_code == 413 and pulled == 0


def test_real_server_answers_413_before_the_chunked_body_ends(backend):
    """uvicorn on 127.0.0.1: limit + 1 bytes of chunks and no final chunk, so a server that
    waited for the whole body would never answer."""
    with running_server(backend) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(MAX_BODY_BYTES // PIECE):
                conn.sendall(b"%x\r\n" % PIECE + b" " * PIECE + b"\r\n")
            conn.sendall(b"1\r\n \r\n")  # the byte over the limit; the terminating 0-chunk never comes
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in reply


def test_small_body_still_served(backend):
    with running_server(backend) as base:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_prompt_tokens_times_batch_is_capped(backend):
    ids = backend.encode_text("The cat sat on the mat")
    with running_server(backend, max_prompt_tokens=3 * len(ids)) as base:
        body = {"model": MODEL, "prompt": [ids] * 3, "max_tokens": 0, "echo": True, "logprobs": 1}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        response = httpx.post(base + "/v1/completions", json={**body, "prompt": [ids] * 4}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "too_many_prompt_tokens"
    assert f"at most {3 * len(ids)} prompt tokens" in error["message"]


def test_default_prompt_token_cap_is_the_documented_one():
    from kompakt.cli.serve import MAX_PROMPT_TOKENS
    from kompakt.serve.state import ServerSettings

    assert ServerSettings().max_prompt_tokens == MAX_PROMPT_TOKENS == 16384
    readme = Path(__file__).parents[2] / "README.md"
    assert "at most 16384 prompt tokens" in " ".join(readme.read_text().split())


def test_chunked_scoring_matches_one_forward_pass(backend, monkeypatch):
    import torch

    from kompakt.serve import backend_transformers

    ids = backend.encode_text("The quick brown fox jumps over the lazy dog again and again")
    assert len(ids) > 7
    monkeypatch.setattr(backend_transformers, "SCORE_CHUNK_TOKENS", 3)  # several chunks on the KV cache
    chunked = backend.score(ids, 2)
    with torch.inference_mode():
        logits = backend.loaded.model(input_ids=torch.tensor([ids])).logits[0]
    rows = torch.log_softmax(logits.float(), dim=-1)
    expected = [float(rows[position - 1, ids[position]]) for position in range(1, len(ids))]
    assert chunked.logprobs[0] is None and chunked.logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(chunked.tokens) == len(chunked.top) == len(ids)
    assert all(len(top) <= 2 and max(top.values()) >= value for top, value in zip(chunked.top[1:], expected))
