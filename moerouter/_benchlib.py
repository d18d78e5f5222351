"""The one benchmark harness: medians of synchronised runs, the same-run copy roof, minimal bytes.

Every moerouter benchmark (``python -m moerouter bench``, the asv suite, the plugins' scripts)
reports a time against a device copy measured in the same process::

    bw_efficiency = (minimal_bytes / time) / copy_bandwidth

``minimal_bytes`` reads each input row once and writes each output row once, counting only the
``R`` rows that reach a real expert (DESIGN.md "Performance yardsticks"). This module holds the
parts that do not depend on an array library: the timing loop, the roof, the byte counts. A
library's part is what it passes in: the call to time, how to wait for it (``sync``), the copy.
Nothing here imports a framework.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "INDEX_BYTES",
    "WEIGHT_BYTES",
    "bw_efficiency",
    "combine_backward_bytes",
    "combine_bytes",
    "copy_bandwidth",
    "dispatch_backward_bytes",
    "dispatch_bytes",
    "median_seconds",
]

#: Bytes of one index (int32) and one routing weight (float32).
INDEX_BYTES = 4
WEIGHT_BYTES = 4


def _no_sync(result: Any) -> None:
    """Synchronous libraries (NumPy, torch on CPU): the result is ready when the call returns."""


def median_seconds(
    run: Callable[[], Any],
    sync: Callable[[Any], None] = _no_sync,
    repeat: int = 5,
    warmup: int = 1,
    *,
    timer: Callable[[Callable[[], Any]], float] | None = None,
) -> float:
    """Median time of ``run()`` over ``repeat`` timed calls, after ``warmup`` untimed ones.

    Each call is timed with ``time.perf_counter`` up to ``sync(result)`` (an asynchronous device
    waits there), unless ``timer`` is given: ``timer(run)`` returns one call's seconds (CUDA
    events, say). The result of a call is dropped at once, as a caller done with it would.
    """
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(repeat):
        if timer is not None:
            times.append(timer(run))
            continue
        started = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def paired_median_seconds(
    first: Callable[[], Any],
    second: Callable[[], Any],
    sync: Callable[[Any], None] = _no_sync,
    repeat: int = 5,
    warmup: int = 2,
) -> tuple[float, float]:
    """Median times of two calls timed in alternation, after ``warmup`` untimed rounds of each.

    Alternating (first, second, then second, first, ...) gives both the same machine: a load that
    drifts during the run, or the page faults of a first call on fresh memory, cannot favour the
    one timed earlier. Use it for a ratio of two ways to do the same work.
    """
    for _ in range(warmup):
        sync(first())
        sync(second())
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(repeat):
        order = ((0, first), (1, second)) if round_ % 2 == 0 else ((1, second), (0, first))
        for index, run in order:
            started = time.perf_counter()
            sync(run())
            times[index].append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def copy_bandwidth(
    copy: Callable[[], Any],
    nbytes: int,
    sync: Callable[[Any], None] = _no_sync,
    repeat: int = 5,
    warmup: int = 1,
    *,
    timer: Callable[[Callable[[], Any]], float] | None = None,
) -> float:
    """The roof: bytes per second of ``copy()``, which copies ``nbytes`` (read + write counted).

    ``copy`` copies between buffers allocated (and touched, so that no page faults are timed)
    before the call; the roof is ``2 * nbytes / median time``.
    """
    return 2 * nbytes / median_seconds(copy, sync, repeat, warmup, timer=timer)


def bw_efficiency(nbytes: int, seconds: float, copy_bytes_per_s: float) -> float:
    """``(nbytes / seconds) / copy_bytes_per_s``: the fraction of the copy roof reached."""
    return nbytes / seconds / copy_bytes_per_s


def dispatch_bytes(*, tokens_read: int, rows: int, dim: int, itemsize: int) -> int:
    """Minimal traffic of dispatch: each routed token read once, ``R`` rows written, ``R`` indices.

    ``tokens_read`` is the number of distinct tokens with at least one real expert (``T`` for
    top-k without drops): a token-centric kernel reads a token once and writes its copies.
    """
    return (tokens_read + rows) * dim * itemsize + rows * INDEX_BYTES


def combine_bytes(*, tokens: int, rows: int, dim: int, itemsize: int) -> int:
    """Minimal traffic of combine: ``R`` rows read, ``T`` rows written, ``R`` indices, weights."""
    return (rows + tokens) * dim * itemsize + rows * (INDEX_BYTES + WEIGHT_BYTES)


def dispatch_backward_bytes(*, tokens: int, rows: int, dim: int, itemsize: int) -> int:
    """Minimal traffic of dispatch's gradient (a gather-sum): ``R`` rows read, ``T`` rows
    written, ``R`` indices read."""
    return (rows + tokens) * dim * itemsize + rows * INDEX_BYTES


def combine_backward_bytes(*, tokens: int, rows: int, dim: int, itemsize: int) -> int:
    """Minimal traffic of combine's gradients: the ``T`` output-gradient rows read once, ``R``
    expert rows read (for the weight gradient), ``R`` row gradients written; indices and weights
    read, weight gradients written."""
    return (tokens + 2 * rows) * dim * itemsize + rows * (INDEX_BYTES + 2 * WEIGHT_BYTES)
