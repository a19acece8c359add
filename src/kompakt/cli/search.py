"""`kompakt search`: architecture search under a parameter target (kompakt.auto.search.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

HELP = ("Search model shapes (layers, MLP, heads, hidden) for a params= target (and a measured speed= factor): "
        "proxy-score each, heal the best, keep the winner.")


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(rows: list[dict], pareto: list[int], winner: int | None) -> Table:
    table = Table(title="kompakt search", show_header=True)
    for column in ("#", "shape", "params", "cut KL", "proxy KL", "healed KL", "gen tok/s", "pp tok/s", "note"):
        table.add_column(column, justify="left" if column in ("shape", "note") else "right", no_wrap=True,
                         overflow="ellipsis", max_width=36 if column == "note" else None)  # fmt: skip
    for row in rows:
        latency = row.get("latency") or {}
        note = ("winner " if row["index"] == winner else "") + ("pareto" if row["index"] in pareto else "")
        speedup = f" ({latency['speedup']:.2f}x)" if latency.get("speedup") else ""
        table.add_row(str(row["index"]), row["describe"], f"{row['params_fraction']:.1%}",
                      _fmt((row.get("cut") or {}).get("kl_mean")), _fmt((row.get("proxy") or {}).get("kl_mean")),
                      _fmt((row.get("final") or {}).get("kl_mean")), _fmt(latency.get("generate_tps"), 0) + speedup,
                      _fmt(latency.get("prefill_tps"), 0), note.strip() or row["status"])  # fmt: skip
    return table


def _pareto_text(rows: list[dict], pareto: list[int]) -> str:
    from kompakt.auto.search.pareto import quality

    parts = []
    for row in (r for r in rows if r["index"] in pareto):
        speed = (row.get("latency") or {}).get("generate_tps")
        parts.append(f"#{row['index']} ({row['params_fraction']:.1%} params, "
                     + (f"{speed:.0f} tok/s, " if speed else "") + f"KL {quality(row):.4f})")  # fmt: skip
    return ", ".join(parts) or "none"


def search_command(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file or embedded name (default: the embedded model)."),
    target: str = typer.Option("params=0.5", "--target", "-t", help="params=F: the fraction of parameters to keep; add ,speed=Nx for N x the original's measured generation tokens/s."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Wall-clock budget, e.g. 20m, 2h (default: none)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (a rerun of the same search resumes)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration / distillation text; default: self-generated."),
    evaluation: Optional[str] = typer.Option(None, "--eval-data", help="Held-out text the KL is measured on (default: the held-out end of --data)."),
    candidates: int = typer.Option(8, "--candidates", help="Most candidate shapes to try."),
    finalists: int = typer.Option(2, "--finalists", help="Best candidates by proxy KL healed longer."),
    proxy_tokens: int = typer.Option(4096, "--proxy-tokens", help="Distillation tokens of each candidate's proxy score."),
    heal_tokens: Optional[int] = typer.Option(None, "--heal-tokens", help="Distillation tokens per finalist (default: what the budget affords)."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Held-out tokens the KL is measured on."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of every distillation (default: distill.kd's)."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure each shape's llama.cpp speed (cached per shape)."),
    seed: int = typer.Option(0, "--seed", help="Seed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory."),
) -> None:
    """Search shapes for a parameter target and keep the best one as a run directory."""
    from kompakt.auto.search.run import search

    console = Console()

    def on_event(kind: str, values: dict) -> None:
        if kind == "candidate":
            console.print(f"candidate {values['index']}: {values['describe']}", highlight=False)
        elif kind == "heal":
            console.print(f"healing candidate {values['index']} with {values['tokens']} tokens", highlight=False)

    result = search(model, target=target, budget=budget, data=data, evaluation=evaluation, out=out, force=force, on_event=on_event,
                    count=candidates, finalists=finalists, proxy_tokens=proxy_tokens, heal_tokens=heal_tokens,
                    eval_tokens=eval_tokens, latency=latency, lr=lr, seed=seed)  # fmt: skip
    console.print(_table(result.rows, result.pareto, result.winner))
    console.print(f"pareto set (params, generation speed vs KL): {_pareto_text(result.rows, result.pareto)}",
                  highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"winner: {result.why}", highlight=False, soft_wrap=True)
    if result.final is not None:
        console.print(f"final: {result.out_dir / 'final'}  (search.json, recipe.yaml in {result.out_dir})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="search", help=HELP)(search_command)
