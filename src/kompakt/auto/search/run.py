"""`kompakt search`: architecture search under a parameter target and a time budget.

Candidates (kompakt.auto.search.shapes) are each cut by the existing passes with their
importance scores and distilled briefly (`proxy_tokens`); their KL to the original on held-out
text ranks them (the proxy). The best `finalists` are healed longer (`heal_tokens`, or what the
remaining budget affords) by one more distill.kd step in the same run directory (the cut and
the proxy steps are reused), and the lowest KL after healing wins. Each candidate's speed is
measured in llama.cpp (kompakt.auto.search.latency); with `speed=` beside `params=`, only shapes
timed at that factor are candidates (kompakt.auto.search.speed).

Run directory::

    out/auto.json             the model fingerprint and target this directory belongs to
    out/candidates/N/         one recipe run per candidate (steps/, lineage.jsonl, final)
    out/reference/            the original's distributions on the evaluation text (computed once)
    out/search.json           every candidate: shape, params, steps, proxy KL, speed, final KL;
                              the Pareto set, the winner and why
    out/recipe.yaml           the winner's recipe (rerun or edit it)
    out/final -> candidates/N/final   the winner: `kompakt evaluate / export` take it
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kompakt.atomic import atomic_symlink, reporting_errors, write_text
from kompakt.auto.outdir import check_out, default_out
from kompakt.auto.search.pareto import pareto_set, quality, why_winner
from kompakt.auto.search.shapes import Origin, Shape, candidates, describe, shape_steps
from kompakt.auto.target import parse_budget, parse_target
from kompakt.errors import ConfigError
from kompakt.recipe.schema import DataSpec, Recipe, Step
from kompakt.rundir.layout import AUTO_FILE, REFERENCE_DIR
from kompakt.units import duration

logger = logging.getLogger(__name__)

Event = Callable[[str, dict], None]
PROXY_SHARE = 0.6  # of the budget for the proxies; the rest heals the finalists
ALL_SHAPES = 10**6  # candidates(count=...) that returns every feasible shape in spread order
HEAL_MIN_TOKENS = 4096


@dataclass
class SearchSettings:
    """The knobs of one search (the CLI's options)."""

    keep: float
    budget_s: float | None
    count: int = 8
    finalists: int = 2
    proxy_tokens: int = 4096
    heal_tokens: int | None = None  # None: what the budget affords
    latency: bool = True
    eval_tokens: int = 4096
    blocks: int = 8
    window: int = 256  # evaluation window and distillation sequence length
    lr: float | None = None  # distill.kd's peak learning rate (None: the pass's default)
    speed: float | None = None  # generation tokens/s factor over the original every candidate must reach
    seed: int = 0

    def validate(self) -> None:
        for name in ("count", "finalists", "proxy_tokens", "eval_tokens", "blocks", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search: {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.heal_tokens is not None and self.heal_tokens < 0:
            raise ConfigError(f"search: --heal-tokens must be >= 0, got {self.heal_tokens}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"search: --lr must be > 0, got {self.lr}")
        if self.speed is not None and not self.latency:
            raise ConfigError("search: --target speed= is judged by measured speed; drop --no-latency")


def _data_spec(original, data: str | None, evaluation: str | None, settings: SearchSettings) -> DataSpec:
    window = min(settings.window, original.context_length)
    spec = DataSpec(calibration=data, evaluation=evaluation, calibration_blocks=settings.blocks, block_len=window,
                    eval_tokens=max(settings.eval_tokens, window), window=window, stride=window)  # fmt: skip
    spec.validate()
    return spec


def _recipe(model: str | None, spec: DataSpec, seed: int, steps: list[Step]) -> Recipe:
    return Recipe(model=model, seed=seed, data=spec, metrics=["ppl", "kl", "top1"], steps=steps)


def _estimate(steps: list[Step], facts, spec: DataSpec) -> float:
    from kompakt.auto.planner import attempt_seconds

    return attempt_seconds(steps, facts, spec)


def _heal_tokens(settings: SearchSettings, left_s: float | None, facts, spec: DataSpec) -> int:
    """Tokens per finalist: the user's, else what the remaining budget affords (0: none)."""
    from kompakt.auto.planner import TRAIN_COST, eval_seconds

    if settings.heal_tokens is not None:
        return settings.heal_tokens
    if left_s is None:
        return 4 * settings.proxy_tokens
    per = left_s / settings.finalists - eval_seconds(facts, spec)
    tokens = int(per * facts.forward_tps / TRAIN_COST) // 1024 * 1024
    return tokens if tokens >= HEAL_MIN_TOKENS else 0


def _metrics(run) -> dict[str, Any]:
    metrics = dict(run.records[-1].get("metrics", {}))
    return {k: metrics.get(k) for k in ("kl_mean", "top1", "ppl_ratio", "ppl")}


def _row(index: int, origin: Origin, shape: Shape, steps: list[Step], latency: dict | None) -> dict[str, Any]:
    return {"index": index, "kind": "+".join(origin.kind(shape)) or "none", "shape": shape.to_dict(),
            "params": shape.params, "params_fraction": round(shape.params / origin.params, 4),
            "describe": describe(origin, shape), "steps": [s.to_dict() for s in steps], "status": "planned",
            "proxy": None, "latency": latency, "finalist": False, "final": None}  # fmt: skip


@dataclass
class SearchResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    winner: int | None
    pareto: list[int]
    why: str
    final: Path | None
    wall_s: float


@dataclass
class _Context:
    """What every stage of one search reads."""

    model: str | None
    original: Any
    origin: Origin
    spec: DataSpec
    facts: Any
    settings: SearchSettings
    out: Path
    started: float
    on_event: Event | None
    original_tps: float | None = None  # the original's measured generation speed (speed= targets)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def emit(self, kind: str, values: dict) -> None:
        if self.on_event is not None:
            self.on_event(kind, values)

    def recipe(self, steps: list[Step]) -> Recipe:
        return _recipe(self.model, self.spec, self.settings.seed, steps)

    def kd(self, tokens: int) -> Step:
        """One distill.kd step of `tokens` (the proxy's or a finalist's healing)."""
        lr = {} if self.settings.lr is None else {"lr": self.settings.lr}
        return Step("distill.kd", {"tokens": int(tokens), "batch_size": 2, "seq_len": self.spec.block_len, **lr})

    def proxy_steps(self, row: dict) -> list[Step]:
        return [Step.from_dict(s) for s in row["steps"]] + [self.kd(self.settings.proxy_tokens)]


def _prepare(model, target, budget, data, evaluation, out, settings_kw, force, on_event) -> tuple[_Context, list[dict]]:
    """Parse, load, plan the candidates and check the budget: every refusal comes before any file."""
    from kompakt.auto.facts import model_facts
    from kompakt.errors import DataError
    from kompakt.model.load import load

    started = time.perf_counter()
    parsed = parse_target(target)
    if parsed.goal != "params" or parsed.size is not None or parsed.bytes is not None:
        raise ConfigError("search takes --target params=F (the fraction of parameters to keep, e.g. params=0.5), "
                          f"optionally with speed=Nx; got {target!r}")  # fmt: skip
    settings = SearchSettings(keep=float(parsed.params), budget_s=parse_budget(budget), speed=parsed.speed, **settings_kw)
    settings.validate()
    if data is not None and not Path(data).expanduser().exists():
        raise DataError(f"--data {data} not found; give an existing text / jsonl / parquet file or dataset directory")
    original = load(model)
    out_dir = Path(out if out is not None else default_out(model, parsed, "search")).expanduser().absolute()
    check_out(out_dir, original.fingerprint(), parsed, force=False)  # refuses another run's directory
    spec = _data_spec(original, data, evaluation, settings)
    origin, shapes, timed, original_tps = _shapes(original, settings)
    facts = model_facts(original)
    rows = [_row(i + 1, origin, shape, shape_steps(origin, shape, settings.blocks), timed.get(shape.key))
            for i, shape in enumerate(shapes)]  # fmt: skip
    ctx = _Context(model, original, origin, spec, facts, settings, out_dir, started, on_event, original_tps)
    cheapest = min(_estimate(ctx.proxy_steps(row), facts, spec) for row in rows)
    if settings.budget_s is not None and settings.budget_s - ctx.elapsed() < cheapest:
        raise ConfigError(f"--budget {duration(settings.budget_s)} is too small for one candidate (≈{duration(cheapest)} "
                          "to cut, distil and evaluate it on this machine); give a larger budget or fewer --proxy-tokens")  # fmt: skip
    check_out(out_dir, original.fingerprint(), parsed, force)  # --force: the old run goes only now
    with reporting_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / AUTO_FILE, json.dumps({"model": model or original.name, "fingerprint": original.fingerprint(),
                                                "target": parsed.text, "command": "search"}) + "\n")  # fmt: skip
    return ctx, rows


def _shapes(original, settings: SearchSettings) -> tuple[Origin, list[Shape], dict[tuple, dict], float | None]:
    """The candidate shapes; under a speed= target, the first of the spread order that llama.cpp
    times at that factor (with their timings and the original's generation tokens/s)."""
    if settings.speed is None:
        return (*candidates(original, settings.keep, settings.count), {}, None)
    from kompakt.auto.search.latency import measure_latency
    from kompakt.auto.search.speed import fast_enough
    from kompakt.model.arch import arch_for

    origin, ordered = candidates(original, settings.keep, count=ALL_SHAPES)
    key = arch_for(original).intermediate_key
    chosen, timed, base = fast_enough(original, origin, ordered, settings.count, settings.speed, key, measure_latency)
    return origin, chosen, timed, base


@dataclass
class _Finished:
    """The part of a run a rerun finds already done (the runner's RunResult fields we read)."""

    records: list[dict[str, Any]]
    final: Path


def _run(ctx: _Context, row: dict, steps: list[Step]):
    """The candidate's run of `steps` in candidates/N: resumed by the runner, or, when the
    directory already holds these steps and more (a finalist's healing), read from its lineage."""
    from kompakt.recipe.runner import run_recipe
    from kompakt.rundir.lineage import read_lineage

    directory = ctx.out / "candidates" / str(row["index"])
    records = read_lineage(directory) if directory.is_dir() else []
    done = [(r["pass"], r["config"]) for r in records[: len(steps)]]
    if len(records) > len(steps) and done == [(s.name, s.resolved().config) for s in steps]:
        return _Finished(records[: len(steps)], directory / records[len(steps) - 1]["dir"])
    return run_recipe(ctx.recipe(steps), directory, reference_dir=ctx.out / REFERENCE_DIR)


def _proxies(ctx: _Context, rows: list[dict]) -> None:
    """Cut + short distillation + KL for each candidate while the proxy share of the budget lasts."""
    from kompakt.errors import KompaktError
    from kompakt.model.load import load

    budget = ctx.settings.budget_s
    for row in rows:
        steps = ctx.proxy_steps(row)
        need = _estimate(steps, ctx.facts, ctx.spec)
        if budget is not None and any(r["proxy"] for r in rows) and ctx.elapsed() + need > PROXY_SHARE * budget:
            row["status"] = f"skipped: the proxies' share of the budget is spent (≈{duration(need)} needed)"
            continue
        ctx.emit("candidate", {"index": row["index"], "describe": row["describe"], "seconds": need})
        began = time.perf_counter()
        try:
            run = _run(ctx, row, steps)
        except KompaktError as error:  # one shape the passes refuse: recorded, the others go on
            row["status"] = f"failed: {error}"
            continue
        row["proxy"] = {**_metrics(run), "tokens": ctx.settings.proxy_tokens}
        row["cut"] = {k: run.records[-2].get("metrics", {}).get(k) for k in ("kl_mean", "top1")}
        row["status"], row["seconds"] = "proxy done", round(time.perf_counter() - began, 1)
        if ctx.settings.latency and row["latency"] is None:  # a speed= search timed the shape already
            row["latency"] = _latency(load(run.final))
        ctx.emit("proxy", row)
        _save(ctx, rows, None, [], "")


def _latency(loaded) -> dict:
    from kompakt.auto.search.latency import measure_latency

    return measure_latency(loaded)


def _finalists(ctx: _Context, rows: list[dict]) -> None:
    """Heal the best `finalists` by proxy KL with one more distill.kd step each."""
    ranked = sorted((r for r in rows if r["proxy"]), key=lambda r: r["proxy"]["kl_mean"])
    for rank, row in enumerate(ranked, 1):
        row["proxy_rank"] = rank
    chosen = ranked[: ctx.settings.finalists]
    left = None if ctx.settings.budget_s is None else max(0.0, ctx.settings.budget_s - ctx.elapsed())
    tokens = _heal_tokens(ctx.settings, left, ctx.facts, ctx.spec)
    for row in chosen:
        row["finalist"] = True
        if not tokens:
            row["status"] = "finalist: no budget left to heal"
            continue
        ctx.emit("heal", {"index": row["index"], "describe": row["describe"], "tokens": tokens})
        began = time.perf_counter()
        run = _run(ctx, row, ctx.proxy_steps(row) + [ctx.kd(tokens)])
        row["final"] = {**_metrics(run), "tokens": tokens}
        row["status"], row["heal_seconds"] = "healed", round(time.perf_counter() - began, 1)
        _save(ctx, rows, None, [], "")


def _save(ctx: _Context, rows: list[dict], winner: int | None, pareto: list[int], why: str) -> None:
    document = {"model": ctx.model or ctx.original.name, "origin": ctx.origin.__dict__, "settings": dict(ctx.settings.__dict__),
                "data": ctx.spec.__dict__, "candidates": rows, "pareto": pareto, "winner": winner, "why": why,
                "original_generate_tps": ctx.original_tps,
                "wall_s": round(ctx.elapsed(), 1),
                "latency": "llama.cpp f16 GGUF, prompt and generation tokens/s, best of 3, fresh process"}  # fmt: skip
    write_text(ctx.out / "search.json", json.dumps(document, indent=1, default=str) + "\n")


def search(model: str | None = None, *, target: str = "params=0.5", budget: str | None = None,
           data: str | None = None, evaluation: str | None = None, out: str | Path | None = None, force: bool = False,
           on_event: Event | None = None, **settings: Any) -> SearchResult:  # fmt: skip
    """Plan the candidates, run the proxy for each, heal the finalists, keep the winner.

    `data` trains and calibrates (None: self-generated text); `evaluation` is the held-out text
    the KL is measured on (None: the held-out end of the run's data). `settings` are SearchSettings fields (count, finalists, proxy_tokens, heal_tokens, latency,
    eval_tokens, blocks, lr, seed). Raises before any file is written: ConfigError (target, budget
    too small for one candidate, no shape within ±3 %), DataError, OutputPathError.
    """
    ctx, rows = _prepare(model, target, budget, data, evaluation, out, settings, force, on_event)
    _save(ctx, rows, None, [], "")
    _proxies(ctx, rows)
    _finalists(ctx, rows)
    scored = [r for r in rows if quality(r) is not None]
    healed = [r for r in scored if r["final"]]
    best = min(healed or scored, key=quality) if scored else None
    winner = best["index"] if best else None
    pareto = pareto_set(rows)
    why = why_winner(rows, winner, pareto) if winner is not None else "no candidate finished"
    final = None
    if best is not None:
        directory = ctx.out / "candidates" / str(winner)
        steps = ctx.proxy_steps(best) + ([ctx.kd(best["final"]["tokens"])] if best["final"] else [])
        write_text(ctx.out / "recipe.yaml", ctx.recipe(steps).to_yaml())
        final = (directory / "final").resolve()
        atomic_symlink(ctx.out / "final", str(final.relative_to(ctx.out)))
    _save(ctx, rows, winner, pareto, why)
    return SearchResult(ctx.out, rows, winner, pareto, why, final, ctx.elapsed())
