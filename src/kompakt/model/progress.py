"""Progress display: kompakt's own is a bar on a terminal and one line per stage elsewhere;
third-party bars are silenced.

transformers ("Writing model shards", "Loading weights"), huggingface_hub (downloads) and
compressed-tensors ("Applying quantization config", "Compressing model") draw tqdm bars on
stderr whether or not it is a terminal; in a log or a pipe each one becomes a line of carriage
returns. kompakt shows its own progress instead, so every call into them is wrapped in
`quiet_third_party()`.

kompakt's own progress (`stages()`, `spinner()`, `stage_line()`): on a terminal a transient rich bar or spinner;
off one, one INFO line per stage on the `kompakt.model.progress` logger. Whether those lines show is
the application's logging choice: the CLI calls `show_stage_lines()` (plain lines on stderr,
whatever the root level, so third-party INFO logs stay hidden); a library user sees them with
`logging.basicConfig(level=logging.INFO)`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

STAGE_LOGGER = __name__  # "kompakt.model.progress"
stage_log = logging.getLogger(STAGE_LOGGER)

# quiet_third_party patches tqdm process-wide: the first entry (of any thread) patches, the last
# exit restores, so nested blocks and the server's background load thread never restore the
# wrong __init__. While any block is open, every thread's tqdm bars are silenced.
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[Any, bool] | None = None  # (tqdm's own __init__ attribute, hf bars were enabled)


def _silence() -> tuple[Any, bool]:
    import tqdm.std
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also huggingface_hub's bars
    own_init = vars(tqdm.std.tqdm)["__init__"]  # as defined (tqdm wraps it in a partialmethod)
    drawing_init = tqdm.std.tqdm.__init__

    def silent_init(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        drawing_init(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = silent_init
    return own_init, was_enabled


def _restore(saved: tuple[Any, bool]) -> None:
    import tqdm.std
    from transformers.utils import logging as hf_logging

    own_init, was_enabled = saved
    tqdm.std.tqdm.__init__ = own_init
    if was_enabled:
        hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block, no tqdm bar is drawn and transformers / huggingface_hub bars are off.

    compressed-tensors (and transformers' GGUF loader) call `tqdm` directly, with no switch, so
    every tqdm created inside the block is created disabled (tqdm's own `disable=True`: it
    still iterates, it only draws nothing). Safe to nest and to use from several threads at
    once: the state before the outermost block is restored when the last block exits.
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = _silence()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                _restore(_quiet_saved)
                _quiet_saved = None


def on_terminal() -> bool:
    """True when stderr (where progress goes) is a terminal."""
    return sys.stderr.isatty()


class _StageLines:
    """The off-terminal stand-in for rich's Progress: one line per task, nothing per step."""

    def __init__(self) -> None:
        self._tasks = 0

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        stage_log.info("%s%s", description, f" ({total:g})" if total else "")
        self._tasks += 1
        return self._tasks

    def advance(self, task: int, advance: float = 1) -> None:
        """Steps are not shown off a terminal."""


@contextlib.contextmanager
def stages() -> Iterator[Any]:
    """A progress display with rich's `add_task(description, total)` / `advance(task, n)`: a
    transient bar on a terminal, else one `kompakt.model.progress` INFO line per added task."""
    if not on_terminal():
        yield _StageLines()
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        yield progress


def stage_line(description: str) -> None:
    """Off a terminal, the one line of a stage whose progress on a terminal is drawn elsewhere
    (e.g. kompakt.evaluate's perplexity bar); on a terminal, nothing."""
    if not on_terminal():
        stage_log.info("%s", description)


@contextlib.contextmanager
def spinner(description: str) -> Iterator[None]:
    """A transient spinner on a terminal; one `kompakt.model.progress` INFO line otherwise."""
    if not on_terminal():
        stage_log.info("%s", description)
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        progress.add_task(description, total=None)
        yield


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test or a caller may replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_stage_lines() -> None:
    """Make kompakt's stage lines visible (plain, on stderr) whatever the root logging level;
    third-party loggers keep theirs. For applications (the CLI); calling it again is harmless."""
    if not any(isinstance(h, _StderrHandler) for h in stage_log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        stage_log.addHandler(handler)
    stage_log.setLevel(logging.INFO)
    stage_log.propagate = False  # the root handler would print each line a second time
