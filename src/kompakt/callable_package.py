"""A subpackage that is also the public API function of the same name.

`kompakt.analyze`, `kompakt.evaluate` and `kompakt.export` are documented functions, and also
the packages that hold them. Importing a subpackage rebinds the parent's attribute to the
module (`import kompakt.analyze` makes `kompakt.analyze` the package), so the package itself is
made callable: `kompakt.analyze(loaded, ids)` calls the function whichever binding is current.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


def make_package_callable(package: str, function: Callable[..., Any]) -> None:
    """Calling the module `package` (already in sys.modules) calls `function`."""

    class CallablePackage(types.ModuleType):
        __doc__ = sys.modules[package].__doc__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    CallablePackage.__call__.__doc__ = function.__doc__
    module = sys.modules[package]
    module.__class__ = CallablePackage
    module.__signature__ = inspect.signature(function)  # help() and IDEs show the function's parameters
