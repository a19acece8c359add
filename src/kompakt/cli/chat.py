"""`kompakt chat [MODEL]`: streaming chat in the terminal (/reset, /exit)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Annotated

import typer
from rich.console import Console

from kompakt.errors import KompaktError

HELP_LINE = "Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits."


def _open_backend(source: str | None, engine: str):
    # Imported here: loading pulls in the model stack, which `kompakt --help` should not pay for.
    from kompakt.serve.backend_choice import open_backend

    return open_backend(source, engine)


def _read_line(prompt: str) -> str | None:
    """One user line; None on EOF or Ctrl-C at the prompt (both mean: quit)."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        return None


def _stream_reply(session, text: str, err: Console) -> None:
    """Print the reply as it streams; Ctrl-C stops this reply only."""
    try:
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        err.print("[dim](interrupted)[/]", highlight=False)
    except KompaktError as error:  # e.g. the history outgrew the context: say so, keep chatting
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def chat(
    model: Annotated[
        str | None,
        typer.Argument(help="HF directory, .gguf file, embedded name or hub id [default: smollm2-135m]."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more varied.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    backend: Annotated[
        str, typer.Option(help="auto (llama.cpp for .gguf when installed, onnxruntime for an ONNX directory) | transformers | llamacpp | onnxruntime.")
    ] = "auto",
) -> None:
    """Chat with a model in the terminal; replies stream as they are generated."""
    from kompakt.serve.backend import Sampling, check_sampling
    from kompakt.serve.backend_choice import choose_backend
    from kompakt.serve.chat_session import ChatSession

    check_sampling(max_new_tokens, temperature, top_p)  # bad options fail before the model loads
    engine = choose_backend(model, backend)
    err = Console(stderr=True)
    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with err.status("loading model...") if err.is_terminal else nullcontext():
        engine_backend = _open_backend(model, engine)
    try:
        session = ChatSession(engine_backend, system=system, sampling=sampling)  # refuses an embedding model
    except KompaktError:
        engine_backend.close()
        raise
    name = engine_backend.model_id
    err.print(f"[bold]{name}[/] - {HELP_LINE}", highlight=False, soft_wrap=True)
    if not session.chat_mode:
        err.print(
            "this model has no chat template: plain continuation mode "
            "(each line is added to a running text the model continues)",
            highlight=False,
            soft_wrap=True,
        )
    try:
        _converse(session, err)
    finally:
        engine_backend.close()


def _converse(session, err: Console) -> None:
    """Read lines until /exit, Ctrl-D or Ctrl-C at the prompt; stream a reply to each."""
    if sys.stdin.isatty():
        try:  # line editing and history for input(); absent on some platforms
            import readline  # noqa: F401
        except ImportError:
            pass
    while (line := _read_line(">>> ")) is not None:
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            err.print("[dim](conversation cleared)[/]", highlight=False)
            continue
        if command:
            _stream_reply(session, line, err)
    sys.stdout.write("\n" if line is None else "")


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
