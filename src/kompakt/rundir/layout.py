"""The run directory: ownership checks, step directories and markers, `final`, `report.md`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kompakt.errors import OutputPathError
from kompakt.atomic import atomic_symlink, write_text
from kompakt.rundir.lineage import LINEAGE, read_lineage

if TYPE_CHECKING:
    from kompakt.recipe.runner import RunResult
    from kompakt.recipe.schema import Recipe

MARKER = "kompakt-step.json"
_RUN_FILES = (LINEAGE, "recipe.yaml", "steps")


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in _RUN_FILES)


def prepare(out: Path, *, force: bool) -> Path:
    """Create `out` (or check it holds a run); with force, clear an existing run first."""
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file; give --out a directory path for the run")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        raise OutputPathError(f"{out} exists and is not a kompakt run directory; choose a new --out")
    if force and out.is_dir():
        shutil.rmtree(out)
    try:
        (out / "steps").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"cannot create {out} ({error.strerror}); choose a writable --out") from None
    return out


def check_lineage(out: Path, hashes: list[str], eval_id: str) -> list[dict[str, Any]]:
    """The finished records that this recipe may reuse (a prefix of its steps), or an error
    when `out` holds a run of a different recipe, model, data or seed."""
    records = read_lineage(out)
    for i, record in enumerate(records):
        if i >= len(hashes) or record.get("hash") != hashes[i]:
            raise OutputPathError(
                f"{out} holds a run of a different recipe, model, data or seed (step {i + 1} differs); "
                "use a new --out, or --force to replace it"
            )
        if record.get("eval_id") != eval_id:
            raise OutputPathError(
                f"{out} was evaluated with other settings (evaluation data, eval_tokens, window, stride "
                "or metrics); use a new --out, or --force to replace it"
            )
    return records


def step_dir_name(index: int, pass_name: str) -> str:
    return f"{index:02d}-{pass_name}"


def clean_steps(out: Path, expected: set[str]) -> None:
    """Remove leftovers under steps/ (temp and work dirs of a killed run, stale steps)."""
    for item in (out / "steps").iterdir():
        if item.name not in expected:
            remove_tree(item)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(directory: Path, values: dict[str, Any]) -> None:
    write_text(directory / MARKER, json.dumps(values, indent=1, default=str) + "\n")


def write_recipe(out: Path, recipe: Recipe) -> None:
    write_text(out / "recipe.yaml", recipe.to_yaml())


def link_final(out: Path, step_dir: str) -> Path:
    """out/final -> the given step directory (relative link, replaced atomically)."""
    atomic_symlink(out / "final", step_dir)
    return out / "final"


# --- report.md --------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _mb(value: Any) -> str:
    return f"{value / 1e6:.1f} MB" if isinstance(value, (int, float)) else ""


def trajectory_rows(baseline: dict[str, Any], records: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the trajectory table (shared by report.md and the CLI table)."""
    rows = []
    base_params = baseline.get("parameters") or 0
    reference = next((r["metrics"]["ppl_reference"] for r in records if "ppl_reference" in r.get("metrics", {})), None)
    for record in [baseline, *records]:
        m = record.get("metrics", {})
        if record is baseline and reference is not None:
            m = {**m, "ppl": reference, "ppl_ratio": 1.0}
        params = record.get("parameters")
        share = f" ({params / base_params:.0%})" if params and base_params else ""
        rows.append([
            str(record["index"]), record["pass"], f"{params / 1e6:.2f} M{share}" if params else "",
            _mb(record.get("bytes")), _fmt(m.get("ppl")), _fmt(m.get("ppl_ratio"), ".3f"),
            _fmt(m.get("kl_mean"), ".4f"), _fmt(m.get("top1"), ".1%"),
            _fmt(m.get("prefill_tps"), ".0f"), _fmt(m.get("generate_tps"), ".1f"),
            _fmt(record.get("wall_s"), ".1f"), record.get("summary", ""),
        ])  # fmt: skip
    return rows


TRAJECTORY_COLUMNS = ["step", "pass", "params", "size", "ppl", "ppl ratio", "KL", "top-1",
                      "prefill tok/s", "gen tok/s", "time s", "summary"]  # fmt: skip


def trajectory(baseline: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the trajectory, without columns that are empty in every row."""
    rows = trajectory_rows(baseline, records)
    keep = [i for i, name in enumerate(TRAJECTORY_COLUMNS) if name in ("step", "pass") or any(row[i] for row in rows)]
    return [TRAJECTORY_COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in rows]


def write_report(result: RunResult) -> None:
    """out_dir/report.md: the recipe's trajectory as a table, with the protocol and outcome."""
    recipe, data = result.recipe, result.recipe.data
    lines = [
        "# kompakt run",
        "",
        f"Model: `{recipe.model or 'embedded default'}`, seed {recipe.seed}. Evaluation: "
        f"{data.evaluation or 'held-out calibration text'}, {data.eval_tokens} tokens, window "
        f"{data.window}, stride {data.stride}; KL and top-1 against the original.",
        "",
    ]
    columns, rows = trajectory(result.baseline, result.records)
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines.append("")
    if result.stopped:
        lines.append(f"**Stopped by a gate:** {result.stopped}")
    if result.final is not None:
        lines.append(f"Final model: `final` -> `{os.readlink(result.final)}`")
    else:
        lines.append("No step passed the gates; no final model.")
    write_text(result.out_dir / "report.md", "\n".join(lines) + "\n")
