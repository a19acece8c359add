"""The OpenAI-compatible HTTP server: app factory (`create_app`) and runner (`serve`).

    serve("small.gguf", port=8000, api_key="...")      # blocks until SIGINT / SIGTERM

fastapi and uvicorn are imported inside these functions (optional extra kompakt[serve]).
The model loads in a background thread after the port is bound, so /health answers 503
while loading and 200 when ready. SIGTERM: uvicorn stops accepting, lets in-flight requests
finish for `drain_seconds`, then cancels them (which stops their generations) and exits.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from kompakt.errors import ConfigError, KompaktError
from kompakt.serve.backend import Backend
from kompakt.serve.backend_choice import check_source, choose_backend, open_backend
from kompakt.serve.limits import ModelWorker
from kompakt.serve.state import ServerSettings, ServerState

log = logging.getLogger(__name__)


def _load_in_background(state: ServerState, loader: Callable[[], Backend]) -> None:
    def run() -> None:
        try:
            state.backend = loader()
            log.info("model %s ready (%s backend)", state.backend.model_id, state.backend.kind)
        except KompaktError as error:
            state.error = error
        except Exception as error:  # noqa: BLE001 - any loader failure must end the server, not hang it
            log.exception("loading the model failed")
            state.error = KompaktError(f"loading the model failed ({type(error).__name__}: {error})")
        if state.error is not None and state.on_load_error is not None:
            state.on_load_error()

    threading.Thread(target=run, name="kompakt-load", daemon=True).start()


def create_app(backend: Backend | Callable[[], Backend], settings: ServerSettings | None = None):
    """A FastAPI app serving `backend` (an instance, or a loader called in a background thread)."""
    try:
        from kompakt.serve.app import build_app
    except ImportError:
        raise ConfigError("the server needs fastapi and uvicorn: pip install 'kompakt[serve]'") from None

    settings = settings or ServerSettings()
    settings.validate()
    state = ServerState(settings=settings, worker=ModelWorker(settings.queue_size))
    if callable(backend) and not hasattr(backend, "stream"):
        return build_app(state, loader=lambda: _load_in_background(state, backend))
    return build_app(state, loader=lambda: setattr(state, "backend", backend))


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (and so reserve) host:port before the model loads; a busy port fails in one line."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot resolve --host {host!r} ({exc.strerror}); use an address such as 127.0.0.1"
        ) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"port {port} on {host} is not available ({exc.strerror}); pick another with --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    settings: ServerSettings | None = None,
    drain_seconds: int = 10,
    n_ctx: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve `model` over the OpenAI API until interrupted.

    Raises:
        ConfigError, ModelNotFoundError, ModelFormatError: bad options, a busy port, a path
        that is no model (all checked before the server starts), or a model that fails to load.
    """
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("the server needs fastapi and uvicorn: pip install 'kompakt[serve]'") from None
    settings = settings or ServerSettings()
    settings.validate()
    kind = choose_backend(model, backend)
    check_source(model, kind)
    sock = bind_socket(host, port)
    app = create_app(lambda: open_backend(model, kind, n_ctx=n_ctx), settings)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_seconds, access_log=False)
    server = uvicorn.Server(config)
    state: ServerState = app.state.kompakt

    def stop() -> None:
        server.should_exit = True

    state.on_load_error = stop
    shown = f"[{host}]" if ":" in host else host
    if announce:
        announce(f"listening on http://{shown}:{sock.getsockname()[1]}/v1 ({kind} backend); loading the model...")
        _announce_when_ready(state, announce)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.error is not None:
        raise state.error


def _announce_when_ready(state: ServerState, announce: Callable[[str], None]) -> None:
    def wait() -> None:
        while state.backend is None and state.error is None:
            time.sleep(0.2)
        if state.backend is not None:
            announce(f"ready: {state.backend.model_id} (context {state.backend.context_length} tokens)")

    threading.Thread(target=wait, name="kompakt-announce", daemon=True).start()
