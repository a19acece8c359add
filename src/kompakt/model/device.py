"""Where models compute: `--device cpu|cuda|auto` (and cuda:N, mps), chosen once per command.

`default_device()` is what kompakt.load puts an in-memory model on and where a streamed model's
layers are onloaded one at a time (kompakt.model.lazy, kompakt.calib.sequential). Without a
choice it is "auto": the GPU when one is usable, else Apple's MPS, else the CPU. A command's
`--device` sets the choice for its duration (`use_device`), so no pass needs a device argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_chosen: list[str] = []  # the innermost `use_device` choice last


def auto_device() -> str:
    """"cuda" when a GPU is usable, else "mps" on Apple silicon, else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_device() -> str:
    """The device chosen by the running command's --device, else `auto_device()`."""
    return _chosen[-1] if _chosen else auto_device()


def check_device(value: str | None) -> str:
    """`value` ("auto", "cpu", "cuda", "cuda:1", "mps"; None = auto) as a usable device name.

    Raises:
        ConfigError: an unknown name, or a device this machine does not have (one line).
    """
    from kompakt.errors import ConfigError

    name = (value or "auto").strip().lower()
    if name == "auto":
        return auto_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {value!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("--device cuda: no usable CUDA GPU here (a CUDA build of torch and a driver are "
                              "needed); use --device cpu or auto")  # fmt: skip
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered from 0")
    elif device.type == "mps" and auto_device() != "mps":
        raise ConfigError("--device mps: Apple's MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown --device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    return str(device)


@contextmanager
def use_device(value: str | None) -> Iterator[str]:
    """Make `value` (checked by `check_device`) the default device inside the block."""
    _chosen.append(check_device(value))
    try:
        yield _chosen[-1]
    finally:
        _chosen.pop()
