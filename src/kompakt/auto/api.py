"""`kompakt compress --target`: analyse, plan, run the plan with back-offs, export, report.

Run directory::

    out/auto.json            the model fingerprint and target this directory belongs to
    out/analysis/            the light phase-1 analysis the plan was made from (json, plots, html)
    out/plan.json            target, budget, facts, every choice in one line, the attempts
    out/recipe.yaml          the recipe of the attempt that produced the result (edit and rerun it)
    out/attempts/N/          one recipe run per attempt (steps/, lineage.jsonl, report.md)
    out/reference/           the original's top-k distributions on the evaluation text, computed
                             once and scored against by every step of every attempt
    out/final -> attempts/N/final
    out/export/              model.gguf (+ .sha256) and hf/ with the model card (README.md)
    out/report.html, report.md, report.json
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kompakt.atomic import atomic_symlink, reporting_errors, write_text
from kompakt.errors import ConfigError
from kompakt.rundir.layout import AUTO_FILE, REFERENCE_DIR
from kompakt.rundir.lineage import read_lineage
from kompakt.auto.outdir import check_out as _check_out, default_out
from kompakt.auto.planner import Plan, make_plan
from kompakt.recipe.schema import DataSpec
from kompakt.auto.target import Target, check_bytes_possible, parse_budget, parse_target
from kompakt.units import duration

logger = logging.getLogger(__name__)

Event = Callable[[str, dict], None]
# The light analysis the planner reads (skip cost and 4-bit sensitivity per layer, on groups of
# 32: the q4_0 block the 4-bit attempts quantize to).
ANALYSIS = dict(n_blocks=4, block_len=256, eval_tokens=256, eval_window=256, group_size=32, reference_eval=False,
                speed=False)  # fmt: skip
DEFAULT_BUDGET = "15m"
# The per-tensor sensitivity behind mixed precision (kompakt.scoring.tensor_sensitivity): the
# Fisher on up to this many calibration tokens, in blocks of this length, fewer (down to 2
# blocks) when its forward + backward passes would take more than this share of the budget.
SENSITIVITY_TOKENS, SENSITIVITY_BLOCK, SENSITIVITY_SHARE = 2048, 256, 0.1


@dataclass
class AutoResult:
    out_dir: Path
    plan: Plan
    final: Path | None = None
    attempt: int | None = None  # index of the attempt that produced the result
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    wall_s: float = 0.0


def _sizes(original, data: str | None, overrides: dict | None) -> tuple[DataSpec, dict]:
    """The run's data sizes and the analysis settings, fitted to the model's context."""
    ctx = original.context_length
    window = min(512, ctx)
    # Self-generated text costs sampling time on the first run (then it is cached): 8 blocks
    # (4096 tokens, the same file the analysis and evaluation defaults use).
    blocks = 32 if data is not None else 8
    spec = DataSpec(calibration=data, calibration_blocks=blocks, block_len=window, eval_tokens=4096,
                    window=window, stride=window)  # fmt: skip
    for key, value in (overrides or {}).items():
        setattr(spec, key, value)
    spec.validate()
    short = min(256, ctx, spec.window)
    # One held-out window: the skip and 4-bit scores are 2 x layers full forwards, the slowest stage.
    analysis = {**ANALYSIS, "block_len": short, "eval_window": short, "eval_tokens": short}
    return spec, analysis


def _analysis(original, data, out: Path, seed: int, settings: dict):
    """The light analysis, reused from out/analysis when it is already there."""
    from kompakt.analyze.api import analyze
    from kompakt.analyze.result import Analysis

    saved = out / "analysis" / "analysis.json"
    if saved.is_file():
        return Analysis.from_dict(json.loads(saved.read_text()))
    ids = data.calibration().reshape(-1)
    return analyze(original, ids, out=out / "analysis", seed=seed, **settings)


def _sensitivity_tokens(facts, budget_s: float | None) -> int:
    """Calibration tokens for the Fisher: SENSITIVITY_TOKENS, or what SENSITIVITY_SHARE of the
    budget affords (≈ 3 forwards per token), in whole blocks, at least two."""
    from kompakt.scoring.tensor_sensitivity import FORWARDS_PER_BLOCK

    if budget_s is None:
        return SENSITIVITY_TOKENS
    affordable = SENSITIVITY_SHARE * budget_s * facts.forward_tps / FORWARDS_PER_BLOCK
    return int(max(2, min(SENSITIVITY_TOKENS, affordable) // SENSITIVITY_BLOCK)) * SENSITIVITY_BLOCK


def _analysis_seconds(facts, settings: dict, spec: DataSpec, target: Target, tokens: int) -> float:
    """The light analysis (a decoder pass over the calibration blocks, then the reference and
    2 x layers edits, each a forward scored against the reference's top-k), plus the original's
    distributions on the evaluation text that every step is scored against (once per run), plus
    the per-tensor sensitivity where the plan allocates types per tensor."""
    from kompakt.auto.mixed import wants_costs
    from kompakt.scoring.tensor_sensitivity import sensitivity_seconds

    calibration = settings["n_blocks"] * settings["block_len"] / facts.calibration_tps
    scored = (1 + 2 * facts.layers) * settings["eval_tokens"] + spec.eval_tokens
    seconds = calibration + scored / facts.scoring_tps + 0.5 * facts.layers
    if wants_costs(target, facts):
        types = max((len(t["bytes"]) for t in facts.tensors), default=0)
        shapes = [tuple(t["shape"][-2:]) for t in facts.tensors]
        seconds += sensitivity_seconds(shapes, types, tokens, facts.forward_tps)
    return seconds


def _tensor_costs(original, run_data, out: Path, seed: int, names: list[str], tokens: int):
    """The per-tensor sensitivity of the file's matrices `names` on the first calibration
    tokens (behind the tokenizer's prefix, as evaluation scores), reused from out/analysis."""
    from kompakt.model.tokens import prefix_ids
    from kompakt.scoring.tensor_sensitivity import TensorSensitivity, tensor_sensitivity

    saved = out / "analysis" / "tensor_sensitivity.json"
    if saved.is_file():
        return TensorSensitivity.from_dict(json.loads(saved.read_text()))
    ids = run_data.calibration().reshape(-1)
    length = min(SENSITIVITY_BLOCK, ids.numel())
    count = max(1, min(tokens, ids.numel()) // length)
    result = tensor_sensitivity(original.model, ids[: count * length].reshape(count, length), names=names,
                                prefix=prefix_ids(original.tokenizer), seed=seed)  # fmt: skip
    saved.parent.mkdir(parents=True, exist_ok=True)
    write_text(saved, json.dumps(result.to_dict()) + "\n")
    return result


def prepare(model: str | None, target_text: str | None, budget: str | None, data: str | None,
            out: str | Path | None, seed: int, force: bool, on_event: Event | None = None,
            data_sizes: dict | None = None):  # fmt: skip
    """Everything up to the plan: parse, load, check the run dir and budget, analyse, plan."""
    from kompakt.model.load import load
    from kompakt.auto.facts import add_analysis, add_tensor_sensitivity, model_facts
    from kompakt.auto.mixed import check_bytes_target, wants_costs
    from kompakt.auto.search.for_plan import search_shape
    from kompakt.recipe.rundata import RunData

    target = parse_target(target_text)
    if target.min_cosine is not None:
        raise ConfigError("--target min-cosine is the floor of sentence encoders; a language model's floor is "
                          "max-kl=0.15 (or max-ppl-ratio=1.2)")  # fmt: skip
    implicit = target_text is None and budget is None
    if implicit:
        budget = DEFAULT_BUDGET  # the no-argument run is planned for this, never refused for it
    budget_s = parse_budget(budget)
    out_dir = Path(out) if out is not None else default_out(model, target)
    out_dir = out_dir.expanduser().absolute()
    if data is not None and not Path(data).expanduser().exists():
        from kompakt.errors import DataError

        raise DataError(f"--data {data} not found; give an existing text / jsonl / parquet file or dataset directory")
    started = time.perf_counter()
    original = load(model)
    _check_out(out_dir, original.fingerprint(), target, force)
    spec, settings = _sizes(original, data, data_sizes)
    facts = model_facts(original)
    check_bytes_possible(target, facts.fp16_bytes)
    check_bytes_target(target, facts)
    cached = (out_dir / "analysis" / "analysis.json").is_file()
    tokens = _sensitivity_tokens(facts, budget_s)
    need = 0.0 if cached else _analysis_seconds(facts, settings, spec, target, tokens)
    if budget_s is not None and not implicit and budget_s < need:
        raise ConfigError(
            f"--budget {duration(budget_s)} is too small to run even the first step: the analysis alone "
            f"takes ≈{duration(need)} on this machine; give a larger budget"
        )
    if budget_s is not None and not implicit:  # the first step must fit too (checked again later)
        make_plan(target, facts, spec, budget_s - need)
    with reporting_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / AUTO_FILE, json.dumps(
        {"model": model or original.name, "fingerprint": facts.fingerprint, "target": target.text}) + "\n")  # fmt: skip
    saved = out_dir / "plan.json"
    if saved.is_file():  # a rerun follows the saved plan, so its finished steps are reused
        return original, Plan.from_dict(json.loads(saved.read_text())), out_dir, started
    _emit(on_event, "analysis", {"seconds": need})
    run_data = RunData(spec, original, seed)
    analysis = _analysis(original, run_data, out_dir, seed, settings)
    add_analysis(facts, analysis)
    if wants_costs(target, facts):
        names = [t["name"] for t in facts.tensors]
        add_tensor_sensitivity(facts, _tensor_costs(original, run_data, out_dir, seed, names, tokens))
    choices: list[str] = []
    left = None if budget_s is None else budget_s - (time.perf_counter() - started)
    searched = search_shape(model, target, data, spec, out_dir, left, seed, choices)
    left = None if budget_s is None else budget_s - (time.perf_counter() - started)
    plan = make_plan(target, facts, spec, left, enforce=False, searched=searched)
    plan.choices[:0] = choices
    write_text(saved, json.dumps(plan.to_dict(), indent=1, default=str) + "\n")
    write_text(out_dir / "recipe.yaml", plan.recipe(0, model=model, seed=seed).to_yaml())
    return original, plan, out_dir, started


def _emit(on_event: Event | None, kind: str, values: dict) -> None:
    if on_event is not None:
        on_event(kind, values)


def floor_crossed(target: Target, metrics: dict) -> str | None:
    """Which floor the measured metrics cross, as a phrase; None when within."""
    kl, ratio = metrics.get("kl_mean"), metrics.get("ppl_ratio")
    if target.max_kl is not None and kl is not None and kl > target.max_kl:
        return f"KL {kl:.3f} > max-kl {target.max_kl:g}"
    if target.max_ppl_ratio is not None and ratio is not None and ratio > target.max_ppl_ratio:
        return f"perplexity ratio {ratio:.3f} > max-ppl-ratio {target.max_ppl_ratio:g}"
    return None


class _Abandon(Exception):
    """Raised from the step callback: this attempt can no longer end within the floor."""

    def __init__(self, reason: str, kl: float | None = None) -> None:
        super().__init__(reason)
        self.kl = kl  # the measured KL that crossed it (re-allocates a mixed back-off)


def _heal_ahead(steps: list, index: int) -> bool:
    return any(step.name.startswith(("distill.", "finetune.", "quant.qat")) for step in steps[index:])


def run_attempts(original, plan: Plan, out_dir: Path, model: str | None, seed: int,
                 on_step: Callable[[dict], None] | None = None, on_event: Event | None = None) -> AutoResult:  # fmt: skip
    """Run the attempts in order until one ends within the floor (or none is left)."""
    from kompakt.recipe.runner import run_recipe

    result = AutoResult(out_dir, plan)
    for index, attempt in enumerate(plan.attempts):
        recipe = plan.recipe(index, model=model, seed=seed)
        run_dir = out_dir / "attempts" / str(index + 1)
        label = attempt.describe()
        _emit(on_event, "attempt", {"index": index + 1, "label": label, "seconds": attempt.seconds})
        outcome = {"attempt": index + 1, "label": label, "run_dir": str(run_dir)}

        def check(record: dict, steps=recipe.steps) -> None:
            if on_step is not None:
                on_step(record)
            crossed = floor_crossed(plan.target, record.get("metrics", {})) if record["index"] else None
            if crossed and not _heal_ahead(steps, record["index"]):
                raise _Abandon(f"step {record['index']} ({record['pass']}): {crossed}", record["metrics"].get("kl_mean"))

        try:
            run = run_recipe(recipe, run_dir, on_step=check, reference_dir=out_dir / REFERENCE_DIR)
            outcome.update(status="within floor", final=str(run.final), metrics=run.records[-1]["metrics"])
            result.outcomes.append(outcome)
            result.final, result.attempt = run.final, index
            write_text(out_dir / "recipe.yaml", recipe.to_yaml())
            break
        except _Abandon as stop:
            outcome.update(status="floor crossed", reason=str(stop))
            result.outcomes.append(outcome)
            _emit(on_event, "back-off", outcome)
            _reallocate(plan, index, stop.kl, out_dir)
    if result.final is None:
        _keep_closest(result)
        if result.attempt is not None:
            write_text(out_dir / "recipe.yaml", plan.recipe(result.attempt, model=model, seed=seed).to_yaml())
    if result.final is not None:
        atomic_symlink(out_dir / "final", str(result.final.resolve().relative_to(out_dir)))
    return result


def _reallocate(plan: Plan, index: int, measured_kl: float | None, out_dir: Path) -> None:
    """Put the re-allocated back-off (planner.reallocated) next in the plan, and save the plan, so
    a rerun follows the same attempts."""
    from kompakt.auto.planner import reallocated

    if measured_kl is None or (attempt := reallocated(plan, index, float(measured_kl))) is None:
        return
    plan.attempts.insert(index + 1, attempt)
    write_text(out_dir / "plan.json", json.dumps(plan.to_dict(), indent=1, default=str) + "\n")


def _keep_closest(result: AutoResult) -> None:
    """No attempt stayed within the floor: keep the finished step closest to it (lowest KL,
    else lowest perplexity ratio) among every attempt's last step, and say so."""
    best = None
    for outcome in result.outcomes:
        run_dir = Path(outcome["run_dir"])
        records = read_lineage(run_dir)
        if not records:
            continue
        metrics = records[-1].get("metrics", {})
        score = (metrics.get("kl_mean", float("inf")), metrics.get("ppl_ratio", float("inf")))
        if best is None or score < best[0]:
            best = (score, outcome, run_dir / records[-1]["dir"], metrics)
    if best is not None:
        _, outcome, final, metrics = best
        result.final, result.attempt = final, outcome["attempt"] - 1
        outcome["status"] = "kept although the floor is crossed (closest to it of all attempts)"
        outcome["metrics"] = metrics


def compress_auto(model: str | None = None, *, target: str | None = None, budget: str | None = None,
                  data: str | None = None, out: str | Path | None = None, plan_only: bool = False,
                  seed: int = 0, force: bool = False, on_step: Callable[[dict], None] | None = None,
                  on_event: Event | None = None, data_sizes: dict | None = None) -> AutoResult:  # fmt: skip
    """Analyse, plan, run with back-offs, export and report (see the module docstring).

    Raises (before any work): ConfigError for a target that cannot be parsed or met in
    principle, a nonsense floor, a budget too small for the first step; OutputPathError for a
    run directory of another model or target.
    """
    from kompakt.auto import deliver
    from kompakt.auto.measured import add_predicted_vs_measured
    from kompakt.report.build import build_report
    from kompakt.report.document import gather

    from kompakt.auto.encoder import compress_encoder, is_encoder_source

    if is_encoder_source(model):  # sentence encoders: their own planner and cosine floor
        return compress_encoder(model, target=target, budget=budget, data=data, out=out, plan_only=plan_only,
                                seed=seed, force=force, on_step=on_step, on_event=on_event)  # fmt: skip
    original, plan, out_dir, started = prepare(model, target, budget, data, out, seed, force, on_event, data_sizes)
    result = AutoResult(out_dir, plan)
    if plan_only:
        return result
    result = run_attempts(original, plan, out_dir, model, seed, on_step=on_step, on_event=on_event)
    failed = None  # an export that failed its check: recorded and reported first, then raised
    if result.final is not None:
        _emit(on_event, "deliver", {})
        result.exports, failed = deliver.export_result(result.final, plan.export_type_for(result.attempt), out_dir)
        metrics = next(o["metrics"] for o in result.outcomes if o["attempt"] == result.attempt + 1)
        write_text(out_dir / "exports.json", json.dumps(result.exports, indent=1) + "\n")
        if failed is None:
            deliver.measure(original, result.exports, metrics, out_dir, seed)
        else:
            (out_dir / "comparison.json").unlink(missing_ok=True)  # an earlier run's, of a good export
    add_predicted_vs_measured(plan, result.outcomes, result.attempt, result.exports)
    result.wall_s = time.perf_counter() - started
    write_text(out_dir / "outcome.json", json.dumps(
        {"outcomes": result.outcomes, "wall_s": result.wall_s, "attempt": result.attempt}, indent=1, default=str) + "\n")  # fmt: skip
    result.report = build_report(out_dir)
    deliver.write_card(out_dir, gather(out_dir), original)  # named by export.public.public_model_name
    if failed is not None:
        raise failed
    return result
