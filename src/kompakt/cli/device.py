"""`--device`, shared by the commands that compute with a model (compress, eval, analyze)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

DEVICE_HELP = "Where to compute: auto (a GPU when there is one), cpu, cuda, cuda:N, mps."


def device_option(more: str = ""):
    """The --device option; `more`: what it means for this command beyond DEVICE_HELP."""
    return typer.Option("auto", "--device", help=f"{DEVICE_HELP} {more}".strip())


def on_device(command: Callable) -> Callable:
    """Run `command` (which takes a `device` keyword, its --device) with that device chosen for
    everything it loads (kompakt.model.device.use_device): an unusable device is a one-line error
    before any work, and the choice ends with the command."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from kompakt.model.device import use_device

        with use_device(kwargs.get("device")):
            return command(*args, **kwargs)

    return run
