"""`kompakt compress`: run a recipe (or --step shortcuts) stepwise, showing the trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import get_console
from rich.live import Live
from rich.table import Table

HELP = "Shrink a model stepwise (a recipe or --step PASS:key=value), evaluating after every step."


def _table(baseline: dict, records: list[dict]) -> Table:
    from kompakt.recipe.rundir import trajectory

    columns, rows = trajectory(baseline, records) if baseline else (["step", "pass"], [])
    table = Table(title="kompakt compress", show_header=True)
    for column in columns:
        wide = column in ("pass", "summary")
        table.add_column(column, justify="left" if wide else "right", no_wrap=True,
                         overflow="ellipsis", max_width=48 if column == "summary" else None)  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def compress_command(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file or embedded name (overrides the recipe's model)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML file."),
    step: Optional[list[str]] = typer.Option(None, "--step", "-s", help="A step without a recipe, e.g. prune.depth:fraction=0.25 (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration text (held-out part evaluates); default: self-generated."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (an existing run of the same recipe resumes)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (overrides the recipe's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory of another recipe."),
) -> None:
    """Shrink a model stepwise (a recipe or --step PASS:key=value), evaluating after every step."""
    from kompakt.recipe.compose import compose_recipe
    from kompakt.recipe.rundir import trajectory_rows
    from kompakt.recipe.runner import run_recipe

    plan = compose_recipe(recipe=recipe, steps=step or [], model=model, data=data, seed=seed)
    plan.validate()  # one-line ConfigError before any weights are loaded
    console = get_console()  # the console progress bars use, so they nest under the live table
    baseline: dict = {}
    records: list[dict] = []

    def on_step(record: dict) -> None:
        if record["index"] == 0:
            baseline.update(record)
        else:
            records.append(record)
        if live is not None:
            live.update(_table(baseline, records), refresh=True)
        else:  # not a terminal: one plain line per step
            row = trajectory_rows(baseline, records)[-1]
            console.print(" | ".join(cell for cell in row if cell), highlight=False, soft_wrap=True)

    live = Live(_table({}, []), console=console, auto_refresh=False) if console.is_terminal else None
    if live is None:
        result = run_recipe(plan, out, force=force, on_step=on_step)
    else:
        with live:
            result = run_recipe(plan, out, force=force, on_step=on_step)
    final = result.final if result.final is not None else result.out_dir
    console.print(f"done: {len(result.records)} step(s); final model: {final} (report: {result.out_dir / 'report.md'})",
                  highlight=False, soft_wrap=True)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("compress", help=HELP)(compress_command)
