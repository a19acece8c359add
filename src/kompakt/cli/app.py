"""The `kompakt` typer application: registers the commands and turns errors into one line."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from kompakt.errors import KompaktError
from kompakt.model.progress import show_stage_lines

app = typer.Typer(
    name="kompakt",
    help="Turn a language model into a small language model: analyse, shrink, heal, export, run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    # Explicit list (no directory walk): every command is one module with a `register(app)`.
    from kompakt.cli import analyze, chat, compress, evaluate, export, imatrix, passes, recipe, report, search, serve

    if app.registered_commands:  # main() may run more than once in one process (tests)
        return
    for module in (analyze, evaluate, chat, compress, search, passes, recipe, serve, export, imatrix, report):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app; a KompaktError becomes one line and exit 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    show_stage_lines()  # kompakt's own progress off a terminal: one plain line per stage
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except KompaktError as error:
        # escaped: "pip install 'kompakt[encoders]'" is not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as click_error:  # click usage errors carry their own exit code
        code = getattr(click_error, "exit_code", None)
        if code is None:
            raise
        show = getattr(click_error, "show", None)
        if show:
            show()
        sys.exit(code)
