"""Run EleutherAI lm-evaluation-harness tasks on an in-memory model (optional extra `kompakt[eval]`).

Nothing is downloaded: the Hub is switched to offline mode for the run, so a task runs only
when its data is local (in the datasets cache, or a custom task YAML under `include_path`
that reads local files, e.g. `dataset_path: json` with `dataset_kwargs: {data_files: ...}`).
A task whose data would need the network is skipped with the reason, not failed.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from kompakt.errors import ConfigError, KompaktError

logger = logging.getLogger(__name__)

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Substrings of the errors datasets / huggingface_hub raise when they would need the network.
_NETWORK_HINTS = (
    "offline",
    "couldn't reach",
    "connection",
    "network",
    "localentrynotfound",
    "cannot find the requested files",
    "not found on the hub",
    "doesn't exist on the hub",
)


@dataclass
class LmEvalResult:
    """Per task: its metrics (lm-eval's names, e.g. "acc,none"), or why it was skipped."""

    results: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise KompaktError(
            f"lm-eval is not installed ({error}); run: pip install 'kompakt[eval]'"
        ) from error
    return lm_eval, HFLM


@contextmanager
def _offline() -> Iterator[None]:
    """Hub offline for datasets / huggingface_hub, restored afterwards."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    patched: list[tuple[object, str, object]] = []
    for name in _OFFLINE_VARS:
        os.environ[name] = "1"
    # Both libraries read the variables at import time; patch their module flags too.
    for module_name, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        try:
            module = __import__(module_name, fromlist=[attr])
        except ImportError:
            continue
        if hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _needs_network(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(hint in text for hint in _NETWORK_HINTS)


def _metrics(raw: dict) -> dict[str, float]:
    return {key: float(value) for key, value in raw.items() if isinstance(value, (int, float)) and key != "alias"}


def run_lm_eval(
    loaded,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
) -> LmEvalResult:
    """Run lm-eval `tasks` on `loaded` (a LoadedModel) without any download.

    Raises:
        KompaktError: lm-eval not installed.
        ConfigError: a task name lm-eval does not know.
    """
    lm_eval, HFLM = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}; list them with `lm-eval ls tasks`")
    device = str(loaded.model.device)
    wrapped = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=device)
    outcome = LmEvalResult()
    for task in tasks:  # one at a time, so one task needing the network does not sink the rest
        try:
            with _offline():
                run = lm_eval.simple_evaluate(
                    model=wrapped, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                    task_manager=manager, log_samples=False, bootstrap_iters=0,
                )
        except Exception as error:  # datasets raises many types for "would need to download"
            if not _needs_network(error):
                raise
            reason = f"data not available offline ({type(error).__name__}); download it into the datasets cache first"
            logger.warning("lm-eval task %s skipped: %s", task, reason)
            outcome.skipped[task] = reason
            continue
        for name, raw in (run or {}).get("results", {}).items():
            outcome.results[name] = _metrics(raw)
    return outcome
