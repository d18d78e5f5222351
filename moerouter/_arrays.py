"""Where the library's new arrays go, and how large their int32 indices may grow.

Two promises of the contract live here, shared by the core and every plugin:

* **Devices.** Every array the library creates is placed with ``device=device_of(input)``, so a
  routing of CUDA (or ``meta``) logits is built on that device and never on the host.
* **Index bounds.** Indices are int32. A shape whose indices would reach ``2**31`` (``T * k``
  assignments, ``G * E * C`` expert slots, plan rows) is refused with a :class:`ValueError`
  naming the sizes, from static shapes only, before any array is built: an int32 ``arange`` past
  ``2**31 - 1`` wraps to negative indices, and ``combine`` would silently skip those rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import device, is_jax_array

__all__ = ["INDEX_LIMIT", "check_concrete", "check_index_bound", "device_of", "host_copy", "on_cpu"]

#: The largest count int32 indices can hold (row numbers ``0 .. INDEX_LIMIT - 1`` and the count
#: of rows itself, e.g. ``Plan.num_valid``).
INDEX_LIMIT = 2**31 - 1


def device_of(array: Any) -> Any:
    """The ``device=`` for arrays built from ``array``: its device, or None to let the library
    place them.

    None for a traced JAX array (it has no device; the trace places new arrays) and for a JAX
    array sharded over several devices, whose ``device`` is a ``Sharding`` that a new array of
    another shape cannot take. JAX moves such uncommitted arrays to their committed partners.
    """
    where = device(array)
    if is_jax_array(array) and getattr(where, "device_set", None) is not None:
        return None
    return where


def check_concrete(array: Any, name: str, function: str) -> None:
    """Raise a clear ValueError when ``array`` has no values for a host-side step to read.

    A few offline functions (expert merging's weight matching, BTM's branching) read values on
    the host; a torch ``meta`` tensor has none. (A traced JAX array raises JAX's own
    ``ConcretizationTypeError``, which already says so.)
    """
    if getattr(getattr(array, "device", None), "type", None) == "meta":
        raise ValueError(
            f"{function} reads the values of {name} on the host, but {name} is a meta tensor "
            "(shapes only): pass a tensor with data"
        )


def host_copy(array: Any, name: str, function: str) -> np.ndarray:
    """A NumPy copy of any backend's array on any device, for a step that runs on the host."""
    check_concrete(array, name, function)
    library = type(array).__module__.partition(".")[0]
    if library == "torch":
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            array = array.float()
        return np.asarray(array.numpy())
    if library == "array_api_strict":
        return np.from_dlpack(array).copy()
    if library == "cupy":
        return np.asarray(array.get())
    return np.asarray(array)


def check_index_bound(what: str, **sizes: int) -> None:
    """Raise a ValueError when the product of ``sizes`` does not fit int32 indices.

    ``what`` names the count (``"assignments"``, ``"plan rows"``, ...); each keyword names one
    size as the user knows it (``T=..., k=...``). Reads Python ints only: no array is touched.
    """
    total = 1
    for value in sizes.values():  # a loop, not math.prod: torch.compile traces it
        total *= value
    if total > INDEX_LIMIT:
        names = " * ".join(sizes)
        product = " * ".join(str(value) for value in sizes.values())
        if len(sizes) > 1:
            product = f"{product} = {total}"
        raise ValueError(
            f"{names} = {product} {what} exceed the int32 index range "
            f"(2**31 - 1 = {INDEX_LIMIT}): split the batch into smaller calls"
        )


def on_cpu(array: Any) -> bool:
    """Whether reading ``array`` on the host costs no device synchronisation (a CPU array)."""
    device = device_of(array)
    kind = getattr(device, "type", None) or getattr(device, "platform", None)
    if isinstance(kind, str):
        return kind == "cpu"  # torch, JAX
    return "cpu" in str(device).lower()  # NumPy ("cpu"), array-api-strict; not CuPy
