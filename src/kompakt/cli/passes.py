"""`kompakt passes list` / `kompakt passes show NAME`: the registered passes and their configs."""

from __future__ import annotations

import shlex

import typer
from rich.console import Console
from rich.table import Table

passes_app = typer.Typer(help="List the compression passes and show their config fields.", no_args_is_help=True)


@passes_app.command("list")
def list_command() -> None:
    """Every pass, one line each: its name and what it does."""
    from kompakt.passes.base import registry

    console = Console()
    passes = registry()
    width = max((len(name) for name in passes), default=0)
    for name, spec in sorted(passes.items()):
        console.print(f"{name:<{width}}  {spec.summary}", highlight=False, soft_wrap=True)


@passes_app.command("show")
def show_command(name: str = typer.Argument(..., help="Pass name, e.g. prune.depth.")) -> None:
    """A pass's config fields (type, default, meaning), what it needs, and a sample step."""
    from kompakt.recipe.describe import describe_pass

    info = describe_pass(name)
    console = Console()
    console.print(f"[bold]{info['name']}[/]  {info['summary']}", highlight=False)
    if info["needs"]:
        console.print(f"needs: {', '.join(info['needs'])}", highlight=False)
    table = Table(show_header=True, box=None, pad_edge=False)
    for column in ("field", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for field in info["fields"]:
        table.add_row(field["name"], field["type"], field["default"], field["doc"])
    console.print(table)
    console.print("\n[bold]sample steps[/] (recipe YAML, then --step):", highlight=False)
    for line in info["sample_yaml"]:
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    for line in info["sample_cli"]:
        console.print(f"  --step {shlex.quote(line)}", highlight=False, markup=False, soft_wrap=True)
    if info["doc"]:
        console.print("\n" + info["doc"], highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(passes_app, name="passes")
