"""`kompakt serve <encoder dir>` in its own process answers /v1/embeddings (the openai client)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kompakt.model.encode import embed  # noqa: E402
from kompakt.model.load import load  # noqa: E402
from kompakt.model.tiny import save_tiny_encoder  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(process: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "server did not become ready"
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def test_serve_command_answers_embeddings(tmp_path):
    directory = tmp_path / "enc"
    save_tiny_encoder("roberta", directory)
    sentences = ["The river runs past the old mill.", "Prices rose again in March."]
    expected = embed(load(directory), sentences).numpy()
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kompakt", "serve", str(directory), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(process, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        served = client.embeddings.create(model="enc", input=sentences)
        np.testing.assert_allclose(np.array([row.embedding for row in served.data]), expected, atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="enc", messages=[{"role": "user", "content": "hi"}])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
