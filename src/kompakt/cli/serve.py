"""`kompakt serve [MODEL]`: an OpenAI-compatible server (chat, completions, embeddings, models, health).

A generation model serves /v1/chat/completions and /v1/completions; a sentence-embedding model
(an encoder such as all-minilm-l6-v2) serves /v1/embeddings; each refuses the other's routes.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

MAX_PROMPT_TOKENS = 16384  # the defaults of kompakt.serve.state.ServerSettings (not imported: --help stays cheap)
MAX_EMBEDDING_TOKENS = 300_000


def serve(
    model: Annotated[
        str | None,
        typer.Argument(help="HF directory, .gguf file, embedded name or hub id (default: smollm2-135m)."),
    ] = None,
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY' (all routes but /health). Default: $KOMPAKT_API_KEY."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto (llama.cpp for .gguf when installed, onnxruntime for an ONNX directory) | transformers | llamacpp | onnxruntime.")
    ] = "auto",
    max_tokens_cap: Annotated[int, typer.Option(help="Most tokens one request may generate.")] = 2048,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait while one generates; more get 503.")] = 16,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Most prompt tokens one /v1/completions request may hold over its batch.")
    ] = MAX_PROMPT_TOKENS,
    max_embedding_tokens: Annotated[
        int, typer.Option(help="Most tokens one /v1/embeddings request may hold over its inputs.")
    ] = MAX_EMBEDDING_TOKENS,
    drain_seconds: Annotated[int, typer.Option(help="On SIGTERM, how long in-flight requests may finish.")] = 10,
    n_ctx: Annotated[
        int | None, typer.Option(help="llama.cpp context size (default: the model's, at most 4096).")
    ] = None,
) -> None:
    """Serve a model over the OpenAI API at http://HOST:PORT/v1 (any OpenAI client works).

    Embedding models (encoders) answer /v1/embeddings; generation models answer chat and completions.
    """
    from kompakt.serve.server import serve as run_server
    from kompakt.serve.state import ServerSettings

    err = Console(stderr=True)
    key = api_key if api_key is not None else os.environ.get("KOMPAKT_API_KEY")
    settings = ServerSettings(
        api_key=key, max_tokens_cap=max_tokens_cap, queue_size=queue_size, max_prompt_tokens=max_prompt_tokens,
        max_embedding_tokens=max_embedding_tokens,
    )  # fmt: skip

    def announce(message: str) -> None:
        err.print(message, highlight=False, soft_wrap=True)

    run_server(
        model, host=host, port=port, backend=backend, settings=settings, drain_seconds=drain_seconds,
        n_ctx=n_ctx, announce=announce,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
