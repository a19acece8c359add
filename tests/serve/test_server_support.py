"""Helpers (no tests): a real server on 127.0.0.1 (uvicorn in a thread, free port), a tiny model."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kompakt.serve.server import bind_socket, create_app
from kompakt.serve.state import ServerSettings

API_KEY = "test-key-123"
MODEL = "tiny-llama"  # the id tiny_backend serves (and /v1/models lists)


@contextmanager
def running_server(backend, **settings):
    """Yields the base URL (http://127.0.0.1:PORT) of a server for `backend`; stops it after."""
    import uvicorn

    torch.set_num_threads(1)  # the test machine is shared
    sock = bind_socket("127.0.0.1", 0)
    app = create_app(backend, ServerSettings(**settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def tiny_backend(tmp_root: Path):
    """A TransformersBackend on a tiny llama saved to disk and loaded back with kompakt.model.load."""
    from kompakt.model.load import load
    from kompakt.model.tiny import save_tiny
    from kompakt.serve.backend_transformers import TransformersBackend

    torch.set_num_threads(1)
    directory = tmp_root / "tiny-llama"
    save_tiny("llama", directory)
    return TransformersBackend(load(directory), model_id=MODEL)
