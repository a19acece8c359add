"""The run directory of a recipe run: ownership checks, step directories and their markers,
`recipe.yaml`, `run.json` (the baseline row and how the run ended, so its report can be rebuilt
from the directory alone) and the `final` link."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kompakt.atomic import atomic_symlink, write_text
from kompakt.errors import OutputPathError
from kompakt.rundir.lineage import LINEAGE, read_lineage

MARKER = "kompakt-step.json"
RECIPE_FILE = "recipe.yaml"
AUTO_FILE = "auto.json"  # compress --target: the fingerprint and target a run directory belongs to
RUN_FILE = "run.json"
# The original's top-k distributions on the evaluation text (kompakt.evaluate.topk), one file per
# model and evaluation setting: computed by the first step's evaluation, read by every later one.
REFERENCE_DIR = "reference"
_RUN_FILES = (LINEAGE, RECIPE_FILE, RUN_FILE, "steps")


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


def write_recipe(out: Path, recipe_yaml: str) -> None:
    write_text(out / RECIPE_FILE, recipe_yaml)


def write_run_state(out: Path, baseline: dict[str, Any], stopped: str | None) -> None:
    """run.json: the original's row (its size and speed are measured once per run, never stored
    in lineage.jsonl) and the gate message that stopped the run, if one did."""
    write_text(out / RUN_FILE, json.dumps({"baseline": baseline, "stopped": stopped}, indent=1, default=str) + "\n")


def link_final(out: Path, step_dir: str) -> Path:
    """out/final -> the given step directory (relative link, replaced atomically)."""
    atomic_symlink(out / "final", step_dir)
    return out / "final"
