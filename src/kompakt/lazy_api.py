"""Lazily imported public names of a package, so importing the package stays cheap."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, api: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `api[name]` (a module path) on first use of `name`."""

    def __getattr__(name: str) -> Any:
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(api[name]), name)

    return __getattr__
