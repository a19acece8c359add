"""`kompakt recipe validate FILE`: check a recipe without loading any weights."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

recipe_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)


@recipe_app.command("validate")
def validate_command(
    path: Path = typer.Argument(..., help="Recipe YAML file."),
    show: bool = typer.Option(False, "--show", help="Print the resolved recipe (every field written out)."),
) -> None:
    """Check a recipe (keys, passes, fields, gates, data paths) without loading weights."""
    from kompakt.recipe.schema import Recipe

    resolved = Recipe.from_file(path).validate()
    console = Console()
    steps = ", ".join(step.name for step in resolved.steps)
    console.print(f"{path}: ok ({len(resolved.steps)} step(s): {steps})", highlight=False, soft_wrap=True)
    if show:
        console.print(resolved.to_yaml(), highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(recipe_app, name="recipe")
