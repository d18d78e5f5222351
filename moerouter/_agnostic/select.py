"""Selection primitives shared by every policy, written once against the array API.

All of them are built from ``argsort(stable=True)``, ``take``, ``take_along_axis`` and
``searchsorted``: no data-dependent shapes, no scatter, so they trace under ``jax.jit`` and
``torch.compile`` unchanged.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import is_torch_array

from moerouter import _registry
from moerouter._arrays import device_of
from moerouter._typing import Array


def top_k(scores: Array, k: int, *, xp: Any) -> Array:
    """Columns of the ``k`` largest entries of each row, best first; ties go to the lower column.

    Sorting ``-scores`` ascending with a stable sort gives exactly that order on every backend
    (negation is exact in floating point, and stability keeps equal scores in column order):
    ``-inf`` entries come after every finite one, NaN entries last. This is the reference of the
    ``top_k`` kernel slot (:func:`select_top_k`).
    """
    order = xp.argsort(-scores, axis=-1, stable=True)
    return order[..., :k]


def select_top_k(scores: Array, k: int, *, xp: Any, nan_free: bool = False) -> Array:
    """:func:`top_k` through the array library's ``top_k`` kernel when its plugin has one.

    The kernels return exactly :func:`top_k`'s columns (same order, same ties) in ``O(T * E)``
    work instead of a full sort of every row: a partial selection of ``k + 1`` entries, and the
    exact sort only for the rows where two of them are equal (a tie that touches the chosen set
    or its boundary) or not comparable (NaN). ``nan_free=True`` promises that ``scores`` hold no
    NaN (cleaned logits), which lets a kernel skip ranking NaN last.
    """
    kernel = _registry.kernel_for("top_k", scores)
    if kernel is None:
        return top_k(scores, k, xp=xp)
    return kernel(scores, k, nan_free=nan_free)


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
    ``num_bins``, and no scatter is needed. The sort need not be stable (equal ids are equal), and
    is not: torch's stable CPU sort pays a thread barrier per pass, which on shared cores costs a
    scheduler time slice each (131072 int32 ids, 2 threads, load 7: 92 ms stable, 1.4 ms not).

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


def pick_columns(values: Array, columns: Array, *, xp: Any) -> Array:
    """``values[n, columns[n]]`` for a ``(N, K)`` array, as ``(N,)``; NaN where out of range."""
    # A one-hot mask rather than a gather: no index dtype to negotiate (torch gathers int64 only,
    # JAX without x64 has no int64), and the gradient is a plain masked copy.
    classes = xp.arange(values.shape[-1], dtype=columns.dtype, device=device_of(values))
    hit = classes[None, :] == columns[:, None]
    picked = xp.sum(xp.where(hit, values, xp.zeros_like(values)), axis=-1)
    return xp.where(xp.any(hit, axis=-1), picked, xp.full_like(picked, xp.nan))
