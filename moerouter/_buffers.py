"""A bounded pool of reusable CPU output buffers that a caller's data can never be handed from.

Why: on a CPU a fresh multi-megabyte array pays a page fault per 4 KiB page on first touch, which
costs more than the gather that fills it (torch ``index_select`` into a fresh tensor 2.6 GB/s,
into a reused one 16.5 GB/s; reference/performance.md §5.2). Reusing a dropped output avoids it.

Safety, by construction: the pool keeps NumPy byte arrays and hands out only *wrappers that hold a
Python reference to the pooled array for as long as anything can reach the memory*:

* NumPy: a view (``region.view(dtype).reshape(shape)``); every view of a view, a ``memoryview``,
  a DLPack capsule and ``torch.from_numpy`` keep their base, the pooled array, alive.
* torch: ``torch.frombuffer(region)``, whose storage drops its reference only in the storage's
  deleter, that is once the last tensor, view, ``UntypedStorage`` object, autograd-saved tensor
  or ``.grad`` on that storage is gone (in whatever thread that happens).

A buffer is reused only while its reference count is the pool's own, checked under the pool's
lock, and the wrapper is built under the same lock: two threads never receive one buffer, and a
buffer anything still refers to is never written. Memory is bounded: at most ``limit`` bytes are
pooled (an environment variable, read per call), least recently used out. A buffer that is evicted
while a caller still holds it stays with that caller and is freed with it.

Outside CPython with the GIL (where reference counts may be inexact) nothing is pooled.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["BufferPool"]

Wrapped = TypeVar("Wrapped")
Bytes = npt.NDArray[np.uint8]

# Smaller outputs come from malloc's own caches quickly: pooling them buys nothing.
MIN_POOLED_BYTES = 1 << 20
# Regions start on a cache line, as torch's own CPU allocations do (SIMD copies prefer it).
_ALIGN = 64


def _references(buffers: list[Bytes], index: int) -> int:
    return sys.getrefcount(buffers[index])


# What _references reports for a buffer only the pool holds, measured on this interpreter
# (reference counting details differ between Python versions).
_UNREFERENCED = _references([np.empty(0, dtype=np.uint8)], 0)


def _counts_are_exact() -> bool:
    gil_check = getattr(sys, "_is_gil_enabled", None)
    return sys.implementation.name == "cpython" and (gil_check is None or gil_check())


class BufferPool:
    """Reusable byte buffers, at most ``limit`` bytes, least recently used out.

    Parameters
    ----------
    limit_variable : str
        Environment variable holding the limit in megabytes (``0`` turns the pool off), read on
        every call so a change applies to the next one.
    default_megabytes : float
        The limit when the variable is unset.
    """

    def __init__(self, limit_variable: str, default_megabytes: float = 1024) -> None:
        self.limit_variable = limit_variable
        self.default_megabytes = default_megabytes
        self._lock = threading.Lock()
        self._buffers: list[Bytes] = []  # least recently handed out first

    def limit(self) -> int:
        """The byte limit now in force."""
        megabytes = os.environ.get(self.limit_variable, str(self.default_megabytes))
        try:
            value = float(megabytes)
        except ValueError:
            raise ValueError(
                f"{self.limit_variable} must be a number of megabytes, got {megabytes!r}"
            ) from None
        return max(0, int(value * (1 << 20)))

    def nbytes(self) -> int:
        """Bytes the pool holds now (free buffers and ones a caller still uses)."""
        with self._lock:
            return sum(buffer.nbytes for buffer in self._buffers)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buffers)

    def clear(self) -> None:
        """Forget every buffer: free ones are freed, held ones are freed with their holders."""
        with self._lock:
            self._buffers.clear()

    def take(self, nbytes: int, wrap: Callable[[Bytes], Wrapped]) -> Wrapped | None:
        """``wrap(region)`` on ``nbytes`` of pooled memory nothing refers to, or None.

        ``wrap`` must return an object that holds ``region`` (a NumPy view, or
        ``torch.frombuffer``) for as long as its memory is reachable: that reference is what keeps
        the buffer from being handed out again. None means "allocate it yourself": the size is
        under :data:`MIN_POOLED_BYTES` or over the limit, or pooling is off.
        """
        limit = self.limit()
        if nbytes < MIN_POOLED_BYTES or nbytes + _ALIGN > limit or not _counts_are_exact():
            return None
        size = nbytes + _ALIGN
        with self._lock:
            buffers = self._buffers
            chosen = next(
                (
                    i
                    for i in range(len(buffers) - 1, -1, -1)
                    if buffers[i].nbytes == size and _references(buffers, i) == _UNREFERENCED
                ),
                None,
            )
            if chosen is None:
                buffers.append(np.empty(size, dtype=np.uint8))
            else:
                buffers.append(buffers.pop(chosen))
            held = sum(buffer.nbytes for buffer in buffers)
            while held > limit:  # least recently used first; never the last (size <= limit)
                held -= buffers.pop(0).nbytes
            buffer = buffers[-1]
            start = -buffer.ctypes.data % _ALIGN
            return wrap(buffer[start : start + nbytes])


def numpy_empty(pool: BufferPool, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
    """Like ``np.empty(shape, dtype)``, from ``pool`` when the size is worth pooling."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    array = pool.take(nbytes, lambda region: region.view(dtype).reshape(shape))
    return np.empty(shape, dtype=dtype) if array is None else array
