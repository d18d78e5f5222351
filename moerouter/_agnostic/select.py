"""Selection primitives shared by every policy, written once against the array API.

All of them are built from ``argsort(stable=True)``, ``take``, ``take_along_axis`` and
``searchsorted``: no data-dependent shapes, no scatter, so they trace under ``jax.jit`` and
``torch.compile`` unchanged.
"""

from __future__ import annotations

from typing import Any

from moerouter._arrays import device_of
from moerouter._typing import Array


def top_k(scores: Array, k: int, *, xp: Any) -> Array:
    """Columns of the ``k`` largest entries of each row, best first; ties go to the lower column.

    Sorting ``-scores`` ascending with a stable sort gives exactly that order on every backend
    (negation is exact in floating point, and stability keeps equal scores in column order).
    """
    order = xp.argsort(-scores, axis=-1, stable=True)
    return order[..., :k]


def inverse_permutation(permutation: Array, *, xp: Any) -> Array:
    """``inverse`` such that ``permutation[inverse[i]] == i``, along the last axis."""
    return xp.argsort(permutation, axis=-1, stable=True)


def descending_rank(scores: Array, *, axis: int, xp: Any) -> Array:
    """Rank of each entry among its neighbours along ``axis``: 0 for the largest, ties by index."""
    order = xp.argsort(-scores, axis=axis, stable=True)
    return xp.argsort(order, axis=axis, stable=True)


def position_in_bucket(bucket: Array, *, xp: Any, device: Any) -> Array:
    """For a 1-D array of bucket ids, how many earlier entries share each entry's bucket.

    A stable sort by bucket keeps the original order inside each bucket; an entry's position is
    then its index minus the index where its bucket starts, which ``searchsorted`` finds.
    """
    order = xp.argsort(bucket, stable=True)
    sorted_bucket = xp.take(bucket, order)
    starts = xp.searchsorted(sorted_bucket, sorted_bucket, side="left")
    position_sorted = xp.arange(bucket.shape[0], dtype=starts.dtype, device=device) - starts
    return xp.take(position_sorted, inverse_permutation(order, xp=xp))


def bincount(ids: Array, num_bins: int, *, xp: Any, device: Any) -> Array:
    """How many entries of the 1-D ``ids`` equal each of ``0 .. num_bins - 1`` (others ignored).

    A sort and two searches rather than a one-hot sum: memory stays O(len(ids)) for any
    ``num_bins``, and no scatter is needed.
    """
    ids = xp.astype(ids, xp.int32)
    in_range = (ids >= 0) & (ids < num_bins)
    ids = xp.where(in_range, ids, xp.asarray(num_bins, dtype=xp.int32, device=device))
    sorted_ids = xp.sort(ids, stable=True)
    edges = xp.arange(num_bins + 1, dtype=xp.int32, device=device)
    bounds = xp.searchsorted(sorted_ids, edges, side="left")
    return xp.astype(bounds[1:] - bounds[:-1], xp.int32)


def pick_columns(values: Array, columns: Array, *, xp: Any) -> Array:
    """``values[n, columns[n]]`` for a ``(N, K)`` array, as ``(N,)``; NaN where out of range."""
    # A one-hot mask rather than a gather: no index dtype to negotiate (torch gathers int64 only,
    # JAX without x64 has no int64), and the gradient is a plain masked copy.
    classes = xp.arange(values.shape[-1], dtype=columns.dtype, device=device_of(values))
    hit = classes[None, :] == columns[:, None]
    picked = xp.sum(xp.where(hit, values, xp.zeros_like(values)), axis=-1)
    return xp.where(xp.any(hit, axis=-1), picked, xp.full_like(picked, xp.nan))
