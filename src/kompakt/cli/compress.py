"""`kompakt compress`: run a recipe (or --step shortcuts) stepwise, showing the trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import get_console
from rich.live import Live
from rich.table import Table

from kompakt.cli.device import device_option, on_device
from kompakt.units import duration

HELP = "Shrink a model: to a --target with an automatic plan (default size=4x,max-kl=0.15), or by --recipe / --step."


def _entries(baseline: dict, records: list[dict]) -> list[dict]:
    from kompakt.report import trajectory

    return [trajectory.entry(record) for record in ([baseline] if baseline else []) + records]


def _table(baseline: dict, records: list[dict]) -> Table:
    from kompakt.report import trajectory

    columns, rows = trajectory.table(_entries(baseline, records)) if baseline else (["step", "pass"], [])
    table = Table(title="kompakt compress", show_header=True)
    for column in columns:
        wide = column in ("pass", "summary")
        table.add_column(column, justify="left" if wide else "right", no_wrap=True,
                         overflow="ellipsis", max_width=48 if column == "summary" else None)  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


@on_device
def compress_command(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file or embedded name (default: the embedded model)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Goal and floor, e.g. size=4x | params=0.5 | bytes=300MB | speed=3x, max-kl=0.15 (default size=4x,max-kl=0.15)."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Wall-clock budget for --target runs, e.g. 30m, 2h."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the plan and the recipe it would run, then stop."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML file (instead of --target)."),
    step: Optional[list[str]] = typer.Option(None, "--step", "-s", help="A step without a recipe, e.g. prune.depth:fraction=0.25 (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration text (held-out part evaluates); default: self-generated."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (an existing run of the same recipe or target resumes)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (overrides the recipe's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory of another recipe or model."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RAM budget, e.g. 6GB: a larger model runs streamed, one layer at a time (--recipe / --step); with --plan-only each step's predicted peak memory and time are printed and checked against it."),
    device: str = device_option("A model larger than --max-memory is onloaded to it one decoder layer at a time."),
    max_gpu_memory: Optional[str] = typer.Option(None, "--max-gpu-memory", help="GPU memory budget, e.g. 8GB, for a streamed run on a GPU (--max-memory below the model's size): checked against each step's predicted peak before any work (with --plan-only too)."),
) -> None:
    """Shrink a model: to a --target with an automatic plan, or by a --recipe / --step list."""
    from kompakt.errors import ConfigError
    from kompakt.model.device import default_device

    if max_gpu_memory is not None and not default_device().startswith("cuda"):
        raise ConfigError("--max-gpu-memory budgets a GPU: run on one (--device cuda) or drop it")
    if recipe is None and not step:
        if max_memory is not None:
            raise ConfigError("--max-memory streams --recipe / --step runs; --target plans load the model whole, "
                              "so drop --max-memory or give the steps with --recipe / --step")  # fmt: skip
        _auto(model, target, budget, plan_only, data, out, seed or 0, force)
        return

    if target is not None or budget is not None:
        raise ConfigError("--target / --budget plan a recipe themselves; drop --recipe and --step")
    if plan_only:
        _memory_plan(model, recipe, step or [], data, seed, max_memory, max_gpu_memory)
        return
    if out is None:
        raise ConfigError("--out is required with --recipe or --step: give the run directory")
    _recipe(model, recipe, step or [], data, out, seed, force, max_memory, max_gpu_memory)


def _live_steps(console):
    """(on_step callback, Live or None): the growing trajectory table on a terminal, lines elsewhere."""
    from kompakt.report import trajectory

    baseline: dict = {}
    records: list[dict] = []
    live = Live(_table({}, []), console=console, auto_refresh=False) if console.is_terminal else None

    def on_step(record: dict) -> None:
        if record["index"] == 0:
            baseline.clear()
            records.clear()
            baseline.update(record)
        else:
            records.append(record)
        if live is not None:
            live.update(_table(baseline, records), refresh=True)
        else:  # not a terminal: one plain line per step
            row = trajectory.rows(_entries(baseline, records))[-1]
            console.print(" | ".join(cell for cell in row if cell), highlight=False, soft_wrap=True)

    return on_step, live


def _recipe(model, recipe, steps, data, out, seed, force, max_memory=None, max_gpu_memory=None) -> None:
    from kompakt.calib.memory_plan import check_budget
    from kompakt.recipe.budget import plan_memory
    from kompakt.recipe.compose import compose_recipe
    from kompakt.recipe.runner import run_recipe
    from kompakt.units import parse_memory

    plan = compose_recipe(recipe=recipe, steps=steps, model=model, data=data, seed=seed)
    plan.validate()  # one-line ConfigError before any weights are loaded
    max_memory = parse_memory(max_memory)  # a bad size is a one-line error before anything is opened
    if max_gpu_memory is not None:  # a step the GPU cannot hold: one line before any work
        check_budget(plan_memory(plan, max_memory, check=False), parse_memory(max_gpu_memory), gpu=True)
    console = get_console()  # the console progress bars use, so they nest under the live table
    on_step, live = _live_steps(console)
    if live is None:
        result = run_recipe(plan, out, force=force, on_step=on_step, max_memory=max_memory)
    else:
        with live:
            result = run_recipe(plan, out, force=force, on_step=on_step, max_memory=max_memory)
    final = result.final if result.final is not None else result.out_dir
    console.print(f"done: {len(result.records)} step(s); final model: {final} (report: {result.out_dir / 'report.md'})",
                  highlight=False, soft_wrap=True)  # fmt: skip


def _memory_plan(model, recipe, steps, data, seed, max_memory, max_gpu_memory=None) -> None:
    """--plan-only with a recipe: each step's predicted peak memory and time (kompakt.recipe.budget)."""
    from kompakt.recipe.budget import plan_memory
    from kompakt.recipe.compose import compose_recipe

    plan = compose_recipe(recipe=recipe, steps=steps, model=model, data=data, seed=seed)
    plan.validate()
    console = get_console()
    estimates = plan_memory(plan, max_memory, max_gpu_memory=max_gpu_memory)  # one-line ConfigError when a step cannot fit
    console.print("predicted per step (from the model's shapes and a measured matrix-multiply rate):", highlight=False)
    for estimate in estimates:
        console.print(f"  {estimate.line()}", highlight=False, soft_wrap=True, markup=False)
    console.print("not run: --plan-only", highlight=False)


_EVENTS = {
    "analysis": lambda v: f"analysing the model (light phase-1 analysis, ≈{duration(v['seconds'])})",
    "attempt": lambda v: f"attempt {v['index']}: {v['label']}"
    + (f" (planned ≈{duration(v['seconds'])})" if v["seconds"] else ""),  # an unbudgeted encoder plan: no estimate
    "int8": lambda v: f"attempt {v['attempt']} within the floor: exporting it as int8 ONNX and scoring that",
    "back-off": lambda v: f"attempt {v['attempt']} abandoned: {v['reason']}; backing off",
    "deliver": lambda v: "exporting, measuring original vs result side by side, writing the report",
}


def _auto(model, target, budget, plan_only, data, out, seed, force) -> None:
    from kompakt.auto.api import compress_auto

    console = get_console()
    on_step, live = _live_steps(console)

    def on_event(kind: str, values: dict) -> None:
        console.print(f"[bold]kompakt[/] {_EVENTS[kind](values)}", soft_wrap=True)

    if live is None or plan_only:
        result = compress_auto(model, target=target, budget=budget, data=data, out=out, plan_only=plan_only,
                               seed=seed, force=force, on_step=on_step, on_event=on_event)  # fmt: skip
    else:
        with live:
            result = compress_auto(model, target=target, budget=budget, data=data, out=out, seed=seed,
                                   force=force, on_step=on_step, on_event=on_event)  # fmt: skip
    _print_plan(console, result)
    if plan_only:
        from kompakt.report.recipe_view import annotated_recipe

        if not result.plan.attempts[0].steps:  # an encoder delivered as int8 ONNX alone
            console.print("attempt 1 runs no recipe: the original is exported as int8 ONNX (not run: --plan-only)",
                          highlight=False)  # fmt: skip
            return
        console.print(f"recipe written to {result.out_dir / 'recipe.yaml'} (not run: --plan-only)", highlight=False)
        recipe = annotated_recipe(result.plan.recipe(0, model=model, seed=seed).to_yaml())
        console.print(recipe, highlight=False, markup=False, soft_wrap=True)
        return
    console.print(f"final model: {result.final}", highlight=False, soft_wrap=True)
    _print_exports(console, result.exports)
    console.print(f"report: {result.report}", highlight=False, soft_wrap=True)


def _print_exports(console, exports: dict[str, str]) -> None:
    """One line per export: its path (and GGUF type), then its runtime check on the next line."""
    kinds = (("hf", "HF directory"), ("gguf", f"GGUF {exports.get('gguf_type', '')}".strip()),
             ("onnx", f"ONNX {exports.get('onnx_type', '')}".strip()))  # fmt: skip
    if not any(kind in exports for kind, _ in kinds):
        console.print(exports.get("onnx_note", "exports: none"), highlight=False, soft_wrap=True, markup=False)
    for kind, label in kinds:
        if kind in exports:
            console.print(f"export ({label}): {exports[kind]}", highlight=False, soft_wrap=True)
            if f"{kind}_check" in exports:
                console.print(f"  check: {exports[f'{kind}_check']}", highlight=False, soft_wrap=True, markup=False)


def _print_plan(console, result) -> None:
    console.print("[bold]plan[/]:", soft_wrap=True)
    for choice in result.plan.choices:
        console.print(f"  - {choice}", highlight=False, soft_wrap=True, markup=False)
    for outcome in result.outcomes:
        console.print(f"  attempt {outcome['attempt']} ({outcome['label']}): {outcome.get('status')}"
                      + (f" — {outcome['reason']}" if outcome.get("reason") else ""), highlight=False, soft_wrap=True)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("compress", help=HELP)(compress_command)
