"""Concurrency on loopback, bounded in count and time: 8 streaming clients, a client that drops
mid-stream, a full queue."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import MODEL, running_server, tiny_backend  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


class SlowBackend:
    """The tiny backend with a pause after every token, so a generation lasts long enough to
    drop or queue behind; counts the tokens it produced."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.steps = inner, delay, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, ids, sampling):
        generator = self.inner.stream(ids, sampling)
        try:
            for chunk in generator:
                time.sleep(self.delay)
                self.steps += 1
                yield chunk
        finally:
            generator.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("serve-load"))


def _sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_eight_concurrent_streaming_clients_all_complete(backend):
    results: list = [None] * 8

    def client(index: int, base: str) -> None:
        with httpx.Client(timeout=120) as http:
            body = {"model": MODEL, "messages": HI, "max_tokens": 12, "temperature": 0.8, "seed": index, "stream": True}
            with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
                results[index] = (response.status_code, _sse_events(response))

    start = time.monotonic()
    with running_server(backend, queue_size=16) as base:
        threads = [threading.Thread(target=client, args=(index, base)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert time.monotonic() - start < 120
    for status, events in results:
        assert status == 200
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert len({chunk["id"] for chunk in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


def test_client_dropping_mid_stream_frees_the_worker(backend):
    slow = SlowBackend(backend, delay=0.05)  # 400 tokens would take 20 s
    with running_server(slow, max_tokens_cap=400) as base:
        body = {"model": MODEL, "messages": HI, "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                seen = sum(1 for _, line in zip(range(6), lines) if line.startswith("data: "))
                assert seen >= 2
            # the connection is closed here, mid-stream
        dropped_at = time.monotonic()
        with httpx.Client(timeout=30) as http:
            reply = http.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2})
        assert reply.status_code == 200
        assert time.monotonic() - dropped_at < 4.0  # the dropped generation stopped within ~2 s
        steps = slow.steps
        time.sleep(0.5)
        assert slow.steps == steps  # nothing generates any more
        assert steps < 150


def test_full_queue_answers_503(backend):
    slow = SlowBackend(backend, delay=0.05)
    with running_server(slow, queue_size=0, max_tokens_cap=200) as base:
        body = {"model": MODEL, "messages": HI, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()  # keep the iterator: dropping it closes the stream
                next(lines)  # the first generation is running
                refused = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=30)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "queue_full"
        with httpx.Client(timeout=30) as http:  # the dropped stream freed its place
            assert (
                http.post(
                    base + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2}
                ).status_code
                == 200
            )


def test_waiting_requests_are_served_in_turn(backend):
    slow = SlowBackend(backend, delay=0.01)
    statuses: list[int] = []

    def ask(base: str) -> None:
        body = {"model": MODEL, "messages": HI, "max_tokens": 10, "temperature": 0}
        statuses.append(httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code)

    with running_server(slow, queue_size=4) as base:
        threads = [threading.Thread(target=ask, args=(base,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert statuses == [200] * 4


def test_non_streaming_client_that_gives_up_frees_the_worker(backend):
    slow = SlowBackend(backend, delay=0.05)
    with running_server(slow, max_tokens_cap=400) as base:
        body = {"model": MODEL, "messages": HI, "max_tokens": 400, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=body, timeout=1.0)  # closes the connection
        gave_up = time.monotonic()
        reply = httpx.post(
            base + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2}, timeout=30
        )
        assert reply.status_code == 200
        assert time.monotonic() - gave_up < 4.0
        assert slow.steps < 150
