"""Counting integer ids on the array API, for the losses and diagnostics a step runs every layer."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_torch_array

from moerouter._typing import Array

__all__ = ["bincount"]


def bincount(ids: Array, num_bins: int, *, xp: Any, device: Any) -> Array:
    """How many entries of the 1-D ``ids`` equal each of ``0 .. num_bins - 1`` (others ignored).

    A sort and two searches rather than a one-hot sum: memory stays O(len(ids)) for any
    ``num_bins``, and no scatter is needed. The sort need not be stable (equal ids are equal), and
    is not: torch's stable CPU sort pays a thread barrier per pass, which on shared cores costs a
    scheduler time slice each (131072 int32 ids, 2 threads, load 7: 92 ms stable, 1.4 ms not).
    The counts are :func:`moerouter._agnostic.select.bincount`'s, exactly.

    On torch CPU the ids are added up instead (``index_add_`` into ``num_bins + 1`` int32
    counters: static shape, so it compiles; integer sums, so exact in any order): no sort at all.
    (Not on CUDA, where ``index_add_`` uses atomics and deterministic mode refuses it.)
    """
    ids = xp.astype(ids, xp.int32)
    in_range = (ids >= 0) & (ids < num_bins)
    ids = xp.where(in_range, ids, xp.asarray(num_bins, dtype=xp.int32, device=device))
    if is_torch_array(ids) and ids.device.type == "cpu":
        counts = xp.zeros(num_bins + 1, dtype=xp.int32, device=device)
        ones = xp.ones(ids.shape, dtype=xp.int32, device=device)
        return counts.index_add_(0, ids, ones)[:num_bins]
    sorted_ids = xp.sort(ids, stable=False)
    edges = xp.arange(num_bins + 1, dtype=xp.int32, device=device)
    bounds = xp.searchsorted(sorted_ids, edges, side="left")
    return xp.astype(bounds[1:] - bounds[:-1], xp.int32)
