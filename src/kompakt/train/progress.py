"""The training progress bar: steps, loss, tokens/s and ETA on stderr; silent when stderr is
not a terminal (logs and CI then get one INFO line per evaluation instead)."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager; `update(step, loss, tokens)` after each optimizer step."""

    def __init__(self, description: str, total_steps: int, start_step: int = 0) -> None:
        self.enabled = sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(), transient=True, disable=not self.enabled,
        )  # fmt: skip
        self.task = self.progress.add_task(description, total=total_steps, completed=start_step, loss="-", tps="-")
        self._started = time.perf_counter()
        self._tokens_at_start: int | None = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, tokens: int) -> None:
        if self._tokens_at_start is None:
            self._tokens_at_start = tokens
            self._started = time.perf_counter()
            rate = "-"
        else:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            rate = f"{(tokens - self._tokens_at_start) / elapsed:,.0f}"
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tps=rate)
