"""Type aliases shared by every core module.

The core is written against the array API and never imports a framework, so an array (a NumPy,
PyTorch, JAX, CuPy or array-api-strict one) and a namespace are typed as ``Any``: one alias here
instead of one per module, so that a stricter type, once the array API ships one, is a one-line
change.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["Array", "Device", "Namespace"]

#: An array of any array-API library.
Array: TypeAlias = Any
#: An array-API namespace (``array_namespace(x)``).
Namespace: TypeAlias = Any
#: A device as ``array_api_compat.device(x)`` returns it (None lets the library place arrays).
Device: TypeAlias = Any
