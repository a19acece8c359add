"""The FastAPI routes of the server (imported only by server.create_app: fastapi is optional).

Every error leaves as the OpenAI error body ({"error": {...}}): the app's own APIError, and
also FastAPI's validation errors (422 -> 400), unknown routes (404), bodies over
MAX_BODY_BYTES (413, refused while reading: kompakt.serve.body_limit) and anything
unexpected (500, logged).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kompakt.serve import completions, embeddings
from kompakt.serve.body_limit import BodyLimit
from kompakt.serve.openai_schema import MAX_BODY_BYTES, APIError, error_body, models_list
from kompakt.serve.state import ENDPOINTS, ServerState

log = logging.getLogger(__name__)


def build_app(state: ServerState, loader: Callable[[], None]) -> FastAPI:
    """Routes over `state`; `loader` runs at startup (sets state.backend, maybe in a thread)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader()
        yield
        state.worker.shutdown()
        if state.backend is not None:
            state.backend.close()

    app = FastAPI(title="kompakt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kompakt = state
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    _add_error_handlers(app)
    authorize = _authorizer(state.settings.api_key)

    @app.get("/health")
    async def health():
        if state.backend is not None:
            backend = state.backend
            endpoints = ENDPOINTS[getattr(backend, "task", "generate")]
            return {"status": "ok", "model": backend.model_id, "backend": backend.kind, "serves": endpoints}
        if state.error is not None:
            return JSONResponse({"status": "error", "message": str(state.error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return models_list(state.ready_backend().model_id, state.created)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        return await completions.chat(state, request, await _json_body(request))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def complete(request: Request):
        return await completions.complete(state, request, await _json_body(request))

    @app.post("/v1/embeddings", dependencies=[Depends(authorize)])
    async def embed(request: Request):
        return await embeddings.embeddings(state, request, await _json_body(request))

    return app


def _authorizer(key: str | None) -> Callable[[Request], None]:
    def authorize(request: Request) -> None:
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant-time comparison: response timing must not reveal how much of a guess matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        return JSONResponse(error_body(f"invalid request: {first.get('msg', 'bad input')}"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(error.detail), type=kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)


async def _json_body(request: Request) -> object:
    body = await request.body()  # at most MAX_BODY_BYTES: BodyLimit stops the read beyond it
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
