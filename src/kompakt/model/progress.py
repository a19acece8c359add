"""Progress display: kompakt's own (rich, on a terminal only), third-party bars silenced.

transformers ("Writing model shards", "Loading weights"), huggingface_hub (downloads) and
compressed-tensors ("Applying quantization config", "Compressing model") draw tqdm bars on
stderr whether or not it is a terminal; in a log or a pipe each one becomes a line of carriage
returns. kompakt shows its own progress instead, so every call into them is wrapped in
`quiet_third_party()`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block, no tqdm bar is drawn and transformers / huggingface_hub bars are off.

    compressed-tensors (and transformers' GGUF loader) call `tqdm` directly, with no switch, so
    every tqdm created inside the block is created disabled (tqdm's own `disable=True`: it
    still iterates, it only draws nothing). The previous state is restored on exit.
    """
    import tqdm.std
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also huggingface_hub's bars
    drawing_init = tqdm.std.tqdm.__init__

    def silent_init(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        drawing_init(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = silent_init
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = drawing_init
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def spinner(description: str) -> Iterator[None]:
    """A transient spinner on a terminal; nothing otherwise."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        progress.add_task(description, total=None)
        yield
