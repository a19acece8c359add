"""Training checkpoints, written atomically, enough to resume a killed run exactly.

A checkpoint is a directory `step-NNNNNNN/` under the run's checkpoint root holding
- `trainable.safetensors`: every trained tensor (model parameters that require grad, plus
  extra trained modules such as hidden-state projections) by name;
- `optimizer.pt`: optimizer and scheduler state dicts and the RNG states (torch.save of
  tensors and numbers only; read back with torch.load(weights_only=True), never unpickled);
- `state.json`: step, data position, tokens seen, the run identity and the loss history.

It is written to a temporary directory and renamed into place; the previous checkpoint is
removed only afterwards, so a kill at any instant leaves the last complete one. A checkpoint
whose identity (a hash of the training setup) differs from the run asking for it is refused:
resuming someone else's run would silently train the wrong thing.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kompakt.atomic import atomic_directory
from kompakt.errors import OutputPathError

logger = logging.getLogger(__name__)

PREFIX = "step-"


@dataclass
class TrainState:
    """Where a run stands: optimizer steps done, batches consumed, tokens seen, history."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())
    return done[-1] if done else None


def check_identity(root: Path, identity: str) -> None:
    """Refuse a checkpoint directory written by a different training setup."""
    found = latest(root)
    if found is None:
        return
    theirs = json.loads((found / "state.json").read_text()).get("identity")
    if theirs != identity:
        raise OutputPathError(
            f"checkpoint directory {root} belongs to a different run (another recipe, model, data or "
            "training config); give a new checkpoint directory or delete that one"
        )


def save(root: Path, identity: str, state: TrainState, tensors: dict[str, torch.Tensor],
         optimizer_state: dict[str, Any]) -> Path:  # fmt: skip
    """Write one checkpoint atomically and drop the older ones; returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{PREFIX}{state.step:07d}"
    with atomic_directory(target, replace=True) as temp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(temp / "trainable.safetensors"))
        torch.save({**optimizer_state, "rng": rng_state()}, temp / "optimizer.pt")
        meta = {"identity": identity, "step": state.step, "position": state.position, "tokens": state.tokens,
                "history": state.history, "evals": state.evals}  # fmt: skip
        (temp / "state.json").write_text(json.dumps(meta))
    for older in root.iterdir():
        if older != target and older.name.startswith(PREFIX):
            shutil.rmtree(older, ignore_errors=True)
    logger.info("checkpoint: step %d (%d tokens) -> %s", state.step, state.tokens, target)
    return target


def load(directory: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any]]:
    """(state, trained tensors, optimizer/scheduler/RNG dict) of one checkpoint directory."""
    meta = json.loads((directory / "state.json").read_text())
    state = TrainState(meta["step"], meta["position"], meta["tokens"], meta.get("history", []), meta.get("evals", []))
    tensors = load_file(str(directory / "trainable.safetensors"))
    extra = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
    return state, tensors, extra
