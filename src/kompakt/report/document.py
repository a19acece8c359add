"""The report of a run as one JSON-able dict (report.json), gathered from the files of the run
directory alone, so `kompakt report RUN` can rebuild it at any time. Two kinds of run:

- a recipe run (`kompakt compress --recipe/--step`, `kompakt.run_recipe`, and each attempt of a
  `--target` run): recipe.yaml, run.json (the original's row, a gate stop), lineage.jsonl, final;
- a `--target` run: auto.json (model, target), plan.json (choices, attempts, facts),
  comparison.json (the measured side-by-side table and sample generations), outcome.json,
  attempts/N/ (recipe runs: the trajectory), analysis/, recipe.yaml, exports.json.

Both give the same keys (title, outcome, trajectory, recipe_shown, ...), which one renderer
(kompakt.report.render) writes as Markdown and HTML.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kompakt.evaluate.topk import TOP_K, kl_label
from kompakt.errors import OutputPathError
from kompakt.report import trajectory
from kompakt.report.recipe_view import annotated_recipe, recipe_values
from kompakt.rundir.layout import RECIPE_FILE, RUN_FILE, is_run_dir

# (key in comparison values, label, how to format, which direction is better)
ROWS = (
    ("parameters", "parameters", "count", "lower"),
    ("size_bytes", "size on disk", "bytes", "lower"),
    ("peak_memory_bytes", "peak memory while generating", "bytes", "lower"),
    ("hardware", "hardware needed (smallest RAM that holds it)", "text", ""),
    ("prefill_tps", "prompt speed (tokens/s)", "rate", "higher"),
    ("generate_tps", "generation speed (tokens/s)", "rate", "higher"),
    ("ppl", "perplexity (held-out text)", "float", "lower"),
    ("kl_mean", "KL to the original (mean)", "float", "lower"),
    ("top1", "top-1 agreement with the original", "pct", "higher"),
    ("energy_j_per_1k", "energy per 1k generated tokens (estimate)", "joules", "lower"),
)
# The same table for sentence encoders (comparison["kind"] == "encoder", kompakt.report.compare_encoder).
ENCODER_ROWS = (
    ("parameters", "parameters", "count", "lower"),
    ("size_bytes", "size on disk", "bytes", "lower"),
    ("peak_memory_bytes", "peak memory while embedding", "bytes", "lower"),
    ("hardware", "hardware needed (smallest RAM that holds it)", "text", ""),
    ("sentences_b1_per_s", "sentences/s, batch 1 (one query)", "rate", "higher"),
    ("sentences_b32_per_s", "sentences/s, batch 32 (indexing)", "rate", "higher"),
    ("cosine_mean", "cosine to the original's embeddings (mean)", "float", "higher"),
    ("recall_at_k", "neighbour recall@{k} vs the original", "pct", "higher"),
    ("spearman", "Spearman of pair similarities vs the original", "float", "higher"),
    ("energy_j_per_1k", "energy per 1k sentences, batch 32 (estimate)", "joules", "lower"),
)


def _read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def format_value(value: Any, kind: str) -> str:
    if value is None or value == "":
        return "—"
    if kind == "count":
        return f"{value / 1e6:.1f} M"
    if kind == "bytes":
        return f"{value / 1e6:.1f} MB"
    if kind == "rate":
        return f"{value:.1f}"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "joules":
        return f"{value:.0f} J ({value / 3600:.3f} Wh)"
    if kind == "float":
        return f"{value:.4g}"
    return str(value)


def _change(original: Any, result: Any, kind: str) -> str:
    if not isinstance(original, (int, float)) or not isinstance(result, (int, float)) or kind in ("text", "pct"):
        return ""
    if kind == "float" and original == 0:
        return ""
    if original == 0 or result == 0:
        return ""
    if kind in ("count", "bytes", "joules"):  # less is better: say how many times less or more
        ratio = original / result
        if abs(ratio - 1) < 0.005:
            return "same"
        less, more = ("smaller", "larger") if kind != "joules" else ("less", "more")
        return f"{ratio:.2f}x {less}" if ratio > 1 else f"{1 / ratio:.2f}x {more}"
    ratio = result / original
    return "same" if abs(ratio - 1) < 0.005 else f"{ratio:.2f}x"


def comparison_rows(comparison: dict) -> list[list[str]]:
    """[label, original, result, change] rows of the LLM-vs-SLM table (its encoder form for encoders)."""
    values = dict(comparison.get("values", {}))
    values["hardware"] = tuple(comparison.get("hardware", ("", "")))
    table = ENCODER_ROWS if comparison.get("kind") == "encoder" else ROWS
    rows = []
    for key, label, kind, _ in table:
        original, result = values.get(key, (None, None))
        label = label.format(k=comparison.get("k", 10))
        rows.append([label, format_value(original, kind), format_value(result, kind), _change(original, result, kind)])
    return rows


def _attempts_trajectory(out: Path) -> list[dict]:
    """Every finished step of every attempt, with the original (step 0) once, for table and plot."""
    rows: list[dict] = []
    for attempt in sorted((out / "attempts").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        if attempt.name.isdigit():
            found = trajectory.read_run(attempt, int(attempt.name))
            rows += [r for r in found if r["step"] != 0 or not rows]
    return rows


NO_RECIPE = ("# no recipe ran: the original was exported as int8 ONNX, the same as\n"
             "# kompakt export MODEL --format onnx --type int8 --out DIR\n")


def _final_outcome(report: dict) -> dict | None:
    """The outcome whose model is the result (None when no attempt finished)."""
    return next((o for o in report["outcomes"] if o.get("status") != "floor crossed"), None)


def final_attempt(report: dict) -> dict:
    """The plan's attempt that produced the result (the first one when none finished)."""
    attempts = report["plan"]["attempts"]
    final = _final_outcome(report)
    return attempts[final["attempt"] - 1] if final is not None else attempts[0]


def _speed_outcome(target: dict, values: dict) -> list[str]:
    """A sentence encoder's speed= target against the speed-up measured at batch 32 (decoder
    speed targets are a search constraint, stated with the shape)."""
    rates = values.get("sentences_b32_per_s", (None, None))
    if not target.get("speed") or not rates[0] or not rates[1]:
        return []
    ratio = rates[1] / rates[0]
    met = "met" if ratio >= target["speed"] else "not met within the floor"
    return [f"Speed at batch 32: {ratio:.2f}x the original's (target {target['speed']:g}x, {met})."]


def outcome_text(report: dict) -> str:
    """One paragraph: was the target met within the floor, and if not, why."""
    plan, comparison = report["plan"], report.get("comparison") or {}
    target = plan["target"]
    values = comparison.get("values", {})
    size = values.get("size_bytes", (None, None))
    factor = size[0] / size[1] if size[0] and size[1] else None
    final = _final_outcome(report)
    head = f"Target `{target['text']}`: "
    if final is None:
        return head + "no attempt finished."
    basis = "size on disk" if comparison.get("kind") == "encoder" else "fp16 size"
    reached = f"the result is {factor:.2f}x smaller than the original's {basis}" if factor else "result measured"
    kl = values.get("kl_mean", (None, None))[1]
    cosine = values.get("cosine_mean", (None, None))[1]  # a sentence encoder
    quality = f", KL {kl:.3f}" if kl is not None else f", mean cosine {cosine:.3f}" if cosine is not None else ""
    parts = [head + reached + quality + "."]
    if final.get("status", "").startswith("kept although"):
        why = f" ({final['reason']})" if final.get("reason") else ""
        parts.append(f"No attempt stayed within the quality floor; attempt {final['attempt']}, the closest to it{why}, "
                     "is kept so it can be inspected.")  # fmt: skip
    parts += _speed_outcome(target, values)
    wanted = target.get("size")
    if wanted and factor and factor < wanted:
        parts.append(f"The size target ({wanted:g}x) was not met within the floor. Why: " + "; ".join(
            c for c in plan["choices"] if "not attempted" in c or "not reachable" in c or "factors" in c) + ".")  # fmt: skip
    for outcome in report["outcomes"]:
        if outcome.get("status") == "floor crossed":
            parts.append(f"Attempt {outcome['attempt']} ({outcome['label']}) was abandoned: {outcome['reason']}.")
    return " ".join(parts)


def gather(out: str | Path) -> dict[str, Any]:
    """report.json's content from the run directory `out` (a --target run or a recipe run)."""
    out = Path(out).expanduser().absolute()
    if (out / "plan.json").is_file():
        return gather_target(out)
    if out.is_dir() and is_run_dir(out):
        return gather_recipe(out)
    raise OutputPathError(
        f"{out} is not a kompakt run directory (no plan.json, lineage.jsonl or recipe.yaml); "
        "give the --out directory of a kompakt compress run"
    )


def _recipe_text(out: Path) -> str:
    return (out / RECIPE_FILE).read_text() if (out / RECIPE_FILE).is_file() else ""


def gather_target(out: Path) -> dict[str, Any]:
    plan = _read_json(out / "plan.json")
    if plan is None:
        raise OutputPathError(f"{out}/plan.json is not readable JSON; rerun the compress --target run into a new --out")
    state = _read_json(out / "outcome.json", {})
    auto = _read_json(out / "auto.json", {})
    recipe_yaml = _recipe_text(out)
    report = {
        "kind": "target",
        "run_dir": str(out),
        "title": f"kompakt: {auto.get('model', 'model')} — original vs small model",
        "auto": auto,
        "plan": plan,
        "outcomes": state.get("outcomes", []),
        "wall_s": state.get("wall_s"),
        "comparison": _read_json(out / "comparison.json"),
        "exports": _read_json(out / "exports.json", {}),
        "trajectory": _attempts_trajectory(out),
        "recipe_yaml": recipe_yaml,
        "recipe_shown": annotated_recipe(recipe_yaml),
        "analysis_dir": str(out / "analysis"),
    }
    report["outcome"] = outcome_text(report)
    if not recipe_yaml and final_attempt(report).get("steps") == []:  # an encoder delivered as int8 alone
        report["recipe_yaml"] = report["recipe_shown"] = NO_RECIPE
    return report


def _recipe_outcome(out: Path, values: dict, state: dict) -> str:
    """The protocol, and how the run ended (a gate stop, the final step)."""
    data = values.get("data") or {}
    evaluation = data.get("evaluation") or "held-out calibration text"
    parts = [f"Model: `{values.get('model') or 'embedded default'}`, seed {values.get('seed', 0)}. Evaluation: "
             f"{evaluation}, {data.get('eval_tokens', '?')} tokens, window {data.get('window', '?')}, stride "
             f"{data.get('stride', '?')}; KL ({kl_label(TOP_K)}) and top-1 against the original."]  # fmt: skip
    if state.get("stopped"):
        parts.append(f"**Stopped by a gate:** {state['stopped']}")
    final = out / "final"
    if final.is_symlink():
        parts.append(f"Final model: `final` -> `{os.readlink(final)}`")
    else:
        parts.append("No step passed the gates; no final model.")
    return "\n\n".join(parts)


def gather_recipe(out: Path) -> dict[str, Any]:
    recipe_yaml = _recipe_text(out)
    values = recipe_values(recipe_yaml)
    state = _read_json(out / RUN_FILE, {})
    return {
        "kind": "recipe",
        "run_dir": str(out),
        "title": f"kompakt run: {values.get('model') or 'embedded default model'}",
        "outcome": _recipe_outcome(out, values, state),
        "stopped": state.get("stopped"),
        "trajectory": trajectory.read_run(out),
        "recipe_yaml": recipe_yaml,
        "recipe_shown": annotated_recipe(recipe_yaml),
        "analysis_dir": str(out / "analysis"),
    }
