"""The run directory of `compress --target`: its default name, and the check that an existing
one belongs to the same model and target (before any work starts). Shared by the decoder
planner (kompakt.auto.api) and the encoder one (kompakt.auto.encoder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kompakt.errors import OutputPathError
from kompakt.auto.target import Target
from kompakt.rundir.layout import AUTO_FILE


def default_out(model: str | None, target: Target, command: str = "") -> Path:
    """runs/MODEL-[COMMAND-]TARGET, e.g. runs/smollm2-135m-size4x, runs/smollm2-135m-search-params0p5."""
    name = Path(str(model or "smollm2-135m")).name.removesuffix(".gguf")
    tag = target.text.replace("=", "").replace(",", "-").replace(".", "p")
    return Path("runs") / "-".join(filter(None, (name, command, tag)))


def check_out(out: Path, fingerprint: str, target: Target, force: bool) -> None:
    """An existing run directory must belong to the same model and target (checked before work)."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file; give --out a directory path for the run")
    marker = out / AUTO_FILE
    if force and out.is_dir():
        shutil.rmtree(out)
        return
    if marker.is_file():
        owner = json.loads(marker.read_text())
        if owner.get("fingerprint") != fingerprint:
            raise OutputPathError(
                f"{out} belongs to a run of another model ({owner.get('model')}); use a new --out, or --force to replace it"
            )
        if owner.get("target") != target.text:
            raise OutputPathError(
                f"{out} holds a run for target {owner.get('target')!r}; use a new --out, or --force to replace it"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise OutputPathError(f"{out} exists and is not a kompakt compress run; choose a new --out")
