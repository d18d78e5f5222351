"""Old import paths that stay: a module that replaces itself with the module that moved."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

__all__ = ["replace_module"]


def replace_module(old_name: str, new: ModuleType, *, deprecated: bool) -> None:
    """Make ``import old_name`` give ``new`` itself, so both paths name one module object.

    Called last by the module at the old path, with its own ``__name__``. With ``deprecated``,
    the importing code gets a :class:`DeprecationWarning` naming the new path; without it (a
    path that is public, such as ``mr.confidence``) nothing is said.
    """
    if deprecated:
        warnings.warn(
            f"{old_name} moved to {new.__name__}; import it from there",
            DeprecationWarning,
            stacklevel=3,  # the code that imports the old path
        )
    sys.modules[old_name] = new
