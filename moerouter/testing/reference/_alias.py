"""The module ``__getattr__`` of the old ``moerouter.testing.reference_*`` paths."""

from __future__ import annotations

from types import ModuleType
from typing import Any


def forward_to(*homes: ModuleType) -> Any:
    """A module-level ``__getattr__`` (PEP 562) that gives a name from the first home holding it.

    Dunder names are not forwarded, so an alias never looks like a package (``__path__``).
    """

    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for home in homes:
                if name in vars(home):
                    return vars(home)[name]
        raise AttributeError(f"module has no attribute {name!r}")

    return __getattr__
