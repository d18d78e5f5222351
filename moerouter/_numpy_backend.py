"""NumPy kernels for make_plan, dispatch, combine and the router: the plugin for ``numpy.ndarray``.

They return what the agnostic path (:mod:`moerouter._agnostic.plan`) returns, faster:

* ``make_plan`` sorts expert ids with NumPy's stable sort on the narrowest integer type that holds
  them (8 or 16 bits: a radix sort, 10-20x faster than sorting int32), inverts the order with one
  1-D assignment instead of a second sort, and counts with ``bincount``. Every integer array is
  identical to the agnostic path's.
* ``dispatch`` is ``np.take(x, source_tokens, axis=0, out=buffer, mode="clip")``: with ``out=``
  and ``mode="clip"`` NumPy copies rows straight into the buffer (the default ``mode="raise"``
  buffers the whole output first). Large gathers are split over a few threads (``np.take``
  releases the GIL). The output is bit-identical to the agnostic path.
* ``combine`` is a token-major gather-reduce. For float32 rows with SciPy installed it is a CSR
  product ``C @ ye`` whose row ``t`` holds token ``t``'s weights at its dispatch rows, in slot
  order: SciPy's loop accumulates ``y[t] += w * ye[row]`` in float32, in that order, which is
  exactly the agnostic path's arithmetic. Otherwise (other dtypes, or no SciPy) blocks of tokens
  gather one slot's rows at a time and add ``w * row`` in float32 (float64 for float64 rows),
  slot by slot: the agnostic path's arithmetic again, bit for bit. Either way there are no
  atomics or scatter-adds: the result is the same run to run and does not depend on other
  tokens' routing.
  Large combines split the tokens over threads (each token's sum is computed whole by one
  thread, so the split changes no result).

* ``top_k`` and ``router`` (the token-choice router slot, :mod:`moerouter.policies._router`):
  float32 scores become unique float64 keys (the value, with the column in the spare mantissa
  bits), ``np.partition`` keeps the ``k`` largest and a sort orders them: exact ties without a
  tie check or a full sort (other dtypes: ``argpartition`` of ``k + 1`` entries, the stable sort
  for rows with a tie at the top). The row maxima give the routable rows and the softmax's shift
  in one pass. Bit-identical to the agnostic path.

Output buffers
--------------
Every call returns an array that nothing else refers to, exactly as a fresh ``np.empty`` would.
Large outputs come from a small cache, because on a CPU a fresh multi-hundred-megabyte array
pays a page fault per page on first touch (about halving dispatch bandwidth). A cached buffer is
handed out again only when its reference count shows that nothing refers to it any more: the
caller dropped the returned array and every view of it (a view, a ``memoryview``, a DLPack or
``torch.from_numpy`` export each hold a reference). A later call can therefore never overwrite an
array the caller still holds (the rules, shared with the torch plugin, are in
:mod:`moerouter._buffers`). The cache keeps at most ``MOEROUTER_NUMPY_CACHE_MB`` megabytes
(default 1024; 0 turns it off), least recently used out; :func:`clear_cache` empties it. Callers
who manage memory themselves can pass ``out=`` to :func:`dispatch` and :func:`combine` here.

``MOEROUTER_NUM_THREADS`` caps the threads a large dispatch or combine uses (default: the CPUs
this process may run on, at most 8). Copies are exact and each token's sum stays on one thread, so
the thread count never changes a result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
from array_api_compat import array_namespace

from moerouter._buffers import BufferPool, numpy_empty
from moerouter._registry import BackendInfo
from moerouter.policies._router import RouterResult, biased_selection, chosen_weights
from moerouter.routing import Plan, Routing

__all__ = ["backend", "clear_cache", "combine", "dispatch", "make_plan", "router", "top_k"]

IntArray = npt.NDArray[np.int32]

# Below this many output bytes a gather is not split over threads (thread hand-off costs ~50 us).
_THREADED_MIN_BYTES = 8 << 20
# Gathered bytes per block in the blocked combine: a block stays in the L2 cache (1 MiB here)
# or close to it; smaller blocks pay more Python overhead per token.
_COMBINE_BLOCK_BYTES = 2 << 20


# --------------------------------------------------------------------------------------------
# make_plan


def _narrow_sort_keys(keys: IntArray, largest: int) -> npt.NDArray[np.integer[Any]]:
    """``keys`` in the narrowest integer type holding ``0 .. largest``: NumPy's stable sort is a
    radix sort for types of 16 bits or fewer."""
    if largest <= np.iinfo(np.uint8).max:
        return keys.astype(np.uint8)
    if largest <= np.iinfo(np.uint16).max:
        return keys.astype(np.uint16)
    return keys


def _stable_argsort(keys: IntArray, largest: int) -> IntArray:
    order = np.argsort(_narrow_sort_keys(keys, largest), kind="stable")
    return order.astype(np.int32, copy=False)


def make_plan(routing: Routing) -> Plan:
    """:func:`moerouter.make_plan` for NumPy arrays; integer fields equal the agnostic path's."""
    token_ids = np.asarray(routing.token_ids)
    expert_ids = np.asarray(routing.expert_ids)
    weights = np.asarray(routing.weights)
    num_tokens, num_experts, fan_in = routing.num_tokens, routing.num_experts, routing.fan_in
    num_rows = int(expert_ids.shape[0])

    real = expert_ids >= 0
    # "No expert" sorts last, after every real expert, as in the agnostic path.
    sort_key = np.where(real, expert_ids, np.int32(num_experts)).astype(np.int32, copy=False)
    largest = max(num_experts, int(sort_key.max())) if num_rows else num_experts
    order = _stable_argsort(sort_key, largest)
    inverse = np.empty(num_rows, dtype=np.int32)
    inverse[order] = np.arange(num_rows, dtype=np.int32)  # 1-D assignment: the inverse permutation
    counts = np.bincount(sort_key, minlength=num_experts + 1)
    group_sizes = counts[:num_experts].astype(np.int32)
    num_valid = np.int32(group_sizes.sum(dtype=np.int64))

    masked_rows = np.where(real, inverse, np.int32(-1)).astype(np.int32, copy=False)
    masked_weights = np.where(real, weights, np.zeros((), dtype=weights.dtype))
    if routing.layout == "token":
        # Assignments are already token-major: token t owns slots t*k .. t*k + k - 1.
        combine_rows = masked_rows.reshape(num_tokens, fan_in)
        combine_weights = masked_weights.reshape(num_tokens, fan_in)
    else:
        combine_rows, combine_weights = _token_major(
            token_ids, masked_rows, masked_weights, num_tokens=num_tokens, fan_in=fan_in
        )
    return Plan(
        group_sizes=group_sizes,
        order=order,
        inverse=inverse,
        source_tokens=np.take(token_ids, order).astype(np.int32, copy=False),
        num_valid=num_valid,
        combine_rows=combine_rows,
        combine_weights=combine_weights,
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


def _token_major(
    token_ids: IntArray,
    masked_rows: IntArray,
    masked_weights: npt.NDArray[Any],
    *,
    num_tokens: int,
    fan_in: int,
) -> tuple[IntArray, npt.NDArray[Any]]:
    """Each token's assignments in assignment order, left-aligned in ``(T, fan_in)``, -1 padded.

    A stable sort by token keeps assignment order inside a token; an assignment's slot is its
    position in the sorted order minus where its token's run starts (a counting sort).
    """
    by_token = _stable_argsort(token_ids, num_tokens - 1)
    sorted_tokens = token_ids[by_token]
    counts = np.bincount(token_ids, minlength=num_tokens)
    starts = np.cumsum(counts) - counts
    slot = np.arange(token_ids.shape[0]) - starts[sorted_tokens]
    keep = slot < fan_in
    combine_rows = np.full((num_tokens, fan_in), -1, dtype=np.int32)
    combine_weights = np.zeros((num_tokens, fan_in), dtype=masked_weights.dtype)
    where = (sorted_tokens[keep], slot[keep])
    combine_rows[where] = masked_rows[by_token[keep]]
    combine_weights[where] = masked_weights[by_token[keep]]
    return combine_rows, combine_weights


# --------------------------------------------------------------------------------------------
# Output buffers: fresh to the caller, recycled only once nothing refers to them.

_pool = BufferPool("MOEROUTER_NUMPY_CACHE_MB")


def clear_cache() -> None:
    """Drop every cached output buffer (one a caller still holds is freed with its holder)."""
    _pool.clear()


def _empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Like ``np.empty``, but large buffers are recycled once no one refers to them any more."""
    return numpy_empty(_pool, shape, dtype)


# --------------------------------------------------------------------------------------------
# Threads for large gathers


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _num_threads() -> int:
    requested = os.environ.get("MOEROUTER_NUM_THREADS")
    if requested:
        return max(1, int(requested))
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, 8))


def _run_split(
    work: Callable[[int, int], None], num_items: int, item_bytes: int, threads: int
) -> None:
    """Run ``work(lo, hi)`` over ``range(num_items)``, split over up to ``threads`` threads."""
    global _executor
    parts = min(threads, max(1, num_items * item_bytes // _THREADED_MIN_BYTES), num_items)
    if parts <= 1:
        work(0, num_items)
        return
    with _executor_lock:
        if _executor is None or _executor._max_workers < parts - 1:
            _executor = ThreadPoolExecutor(parts - 1, thread_name_prefix="moerouter")
        executor = _executor
    bounds = [num_items * p // parts for p in range(parts + 1)]
    futures: list[Future[None]] = [
        executor.submit(work, bounds[p], bounds[p + 1]) for p in range(1, parts)
    ]
    work(bounds[0], bounds[1])
    for future in futures:
        future.result()


# --------------------------------------------------------------------------------------------
# dispatch


def dispatch(
    x: npt.NDArray[Any], plan: Plan, *, out: npt.NDArray[Any] | None = None
) -> npt.NDArray[Any]:
    """:func:`moerouter.dispatch` for NumPy arrays; bit-identical to the agnostic path.

    ``out``, if given, is a C-contiguous ``(R, d)`` array of ``x``'s dtype that receives the rows
    and is returned; by default the result is a new array (see the module docstring).
    """
    num_rows, features = plan.num_rows, int(x.shape[1])
    if out is None:
        out = _empty((num_rows, features), x.dtype)
    elif out.shape != (num_rows, features) or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous ({num_rows}, {features}) {x.dtype} array, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    num_valid = int(plan.num_valid)
    source_tokens = np.asarray(plan.source_tokens)

    def gather(lo: int, hi: int) -> None:
        np.take(x, source_tokens[lo:hi], axis=0, out=out[lo:hi], mode="clip")

    _run_split(gather, num_valid, features * x.dtype.itemsize, _num_threads())
    out[num_valid:] = 0
    return out


# --------------------------------------------------------------------------------------------
# combine


def _scipy_sparse() -> Any:
    """``scipy.sparse``, or None when SciPy is not installed (it is an optional extra)."""
    try:
        import scipy.sparse
    except ImportError:
        return None
    return scipy.sparse


def _packed_entries(plan: Plan) -> tuple[IntArray, npt.NDArray[np.float32], IntArray]:
    """Each token's real entries (``combine_rows >= 0``) in slot order, CSR style.

    Returns ``(rows, weights, counts)``: the concatenated dispatch rows and weights of token 0's
    entries, then token 1's, ..., and how many each token has.
    """
    combine_rows = np.asarray(plan.combine_rows)
    combine_weights = np.asarray(plan.combine_weights, dtype=np.float32)
    present = combine_rows >= 0
    if present.all():
        num_tokens, fan_in = combine_rows.shape
        return (
            combine_rows.reshape(-1),
            combine_weights.reshape(-1),
            np.full(num_tokens, fan_in, dtype=np.int32),
        )
    counts = present.sum(axis=1, dtype=np.int32)
    return combine_rows[present], combine_weights[present], counts


def combine(
    ye: npt.NDArray[Any], plan: Plan, *, out: npt.NDArray[Any] | None = None
) -> npt.NDArray[Any]:
    """:func:`moerouter.combine` for NumPy arrays; float32 (float64 for float64 rows) accumulation
    in slot order.

    ``out``, if given, is a ``(T, d)`` array of ``ye``'s dtype that receives the result and is
    returned; by default the result is a new array.
    """
    num_tokens, features = plan.num_tokens, int(ye.shape[1])
    if out is not None and (out.shape != (num_tokens, features) or out.dtype != ye.dtype):
        raise ValueError(
            f"out must be a ({num_tokens}, {features}) {ye.dtype} array, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    rows, weights, counts = _packed_entries(plan)
    if out is None:
        out = _empty((num_tokens, features), ye.dtype)
    starts = np.zeros(num_tokens + 1, dtype=np.int64)  # token t's entries: starts[t]:starts[t+1]
    np.cumsum(counts, out=starts[1:])
    # SciPy accumulates in the result type: float32 rows in float32, float64 rows in float64.
    sparse = _scipy_sparse() if ye.dtype in (np.float32, np.float64) else None
    index_type = np.int32 if max(ye.shape[0], rows.shape[0]) < 2**31 else np.int64

    def reduce_tokens(lo: int, hi: int) -> None:
        first, last = int(starts[lo]), int(starts[hi])
        if sparse is None:
            _combine_blocked(ye, rows[first:last], weights[first:last], counts[lo:hi], out[lo:hi])
            return
        matrix = sparse.csr_array(
            (
                weights[first:last],
                rows[first:last].astype(index_type),
                (starts[lo : hi + 1] - first).astype(index_type),
            ),
            shape=(hi - lo, int(ye.shape[0])),
        )
        np.copyto(out[lo:hi], matrix @ ye)

    # Tokens are independent, so splitting them over threads (SciPy's CSR product and np.take
    # release the GIL) changes no result.
    entries_per_token = max(1, rows.shape[0] // max(num_tokens, 1))
    row_bytes = features * ye.dtype.itemsize * entries_per_token
    _run_split(reduce_tokens, num_tokens, row_bytes, _num_threads())
    return out


def _combine_blocked(
    ye: npt.NDArray[Any],
    rows: IntArray,
    weights: npt.NDArray[np.float32],
    counts: IntArray,
    out: npt.NDArray[Any],
) -> None:
    """Blocks of tokens gather their rows, then add ``w * row`` slot by slot in float32 (float64
    for float64 rows).

    Each product is rounded, then added, in slot order, starting from zero: the agnostic path's
    arithmetic, element by element. A token's sum therefore depends on its own entries only. (One
    ``np.matmul`` per block, as before, rounded differently with the block's largest fan-in: a
    token's output changed by an ulp when its neighbours had more entries.)
    """
    num_tokens, features = out.shape
    accumulate = np.promote_types(ye.dtype, np.float32)
    max_fan_in = int(counts.max()) if num_tokens else 0
    if max_fan_in == 0:
        out[...] = 0
        return
    if rows.shape[0] == num_tokens * max_fan_in and bool(np.all(counts == max_fan_in)):
        filled = None  # every token has the same number of entries: no padding anywhere
        token_rows = rows.reshape(num_tokens, max_fan_in)
        token_weights = weights.reshape(num_tokens, max_fan_in)
    else:
        # Left-align each token's entries into (T, max_fan_in) slots; empty slots read row 0 and
        # are left out of the sum (``where=``), so rows past num_valid never reach it.
        starts = np.cumsum(counts, dtype=np.int64) - counts
        slot = np.arange(max_fan_in)
        filled = slot[None, :] < counts[:, None]
        entry = np.where(filled, starts[:, None] + slot[None, :], 0)
        token_rows = np.where(filled, rows[entry], 0).astype(np.int32, copy=False)
        token_weights = np.where(filled, weights[entry], 0)
    token_weights = token_weights.astype(accumulate, copy=False)
    block = max(1, _COMBINE_BLOCK_BYTES // (features * accumulate.itemsize))
    gathered = np.empty((block, features), dtype=ye.dtype)
    # Rows already in the accumulation dtype are scaled where they were gathered.
    product = gathered if ye.dtype == accumulate else np.empty((block, features), accumulate)
    direct = out.dtype == accumulate
    accumulator = out if direct else np.empty((block, features), accumulate)
    for lo in range(0, num_tokens, block):
        hi = min(lo + block, num_tokens)
        size = hi - lo
        fan_in = max_fan_in if filled is None else int(counts[lo:hi].max())
        total = out[lo:hi] if direct else accumulator[:size]
        total[...] = 0
        for f in range(fan_in):
            np.take(ye, token_rows[lo:hi, f], axis=0, out=gathered[:size], mode="clip")
            np.multiply(token_weights[lo:hi, f, None], gathered[:size], out=product[:size])
            if filled is None or filled[lo:hi, f].all():
                np.add(total, product[:size], out=total)
            else:
                np.add(total, product[:size], out=total, where=filled[lo:hi, f, None])
        if not direct:
            np.copyto(out[lo:hi], total, casting="unsafe")


# --------------------------------------------------------------------------------------------
# router


def _reference_top_k(scores: npt.NDArray[Any], k: int) -> npt.NDArray[np.intp]:
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


#: Keys as float64 hold a float16/float32 value exactly with 29 low mantissa bits to spare.
_KEY_DTYPES = (np.float16, np.float32)
_KEY_BITS = 29
#: ``+-inf`` become ``+-2**1000``: beyond every float32, and with a zero mantissa to fill.
_KEY_BOUND = 2.0**1000


def _unique_key_top_k(scores: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64] | None:
    """The ``k`` best columns through a partition of unique float64 keys; None if E is too big.

    Each float32 value becomes a float64 (exact: its 29 low mantissa bits are zero) whose low
    bits then hold the column, ranked so that of two equal values the lower column has the
    larger key: ``E - 1 - column`` for values >= 0, ``column`` for negative ones (a larger
    mantissa moves a negative key down). Every key is distinct and orders as the reference does
    (``-0.0`` is first made ``0.0``; ``+-inf`` are clipped to ``+-2**1000``), so ``np.partition``
    of the values (SIMD; ``argpartition`` is ten times slower) and a sort of the ``k`` kept
    give the exact answer with no tie check. A NaN key stays NaN and sorts last: its row
    (the first kept key is NaN) takes the stable sort.
    """
    best = _best_keys(scores, k)
    if best is None:
        return None
    kept, lowest = best
    columns = _key_columns(kept, lowest)
    nan_rows = np.isnan(kept[..., 0])
    if nan_rows.any():
        num_columns = scores.shape[-1]
        flat = columns.reshape(-1, k)
        rows = np.flatnonzero(nan_rows)
        flat[rows] = _reference_top_k(scores.reshape(-1, num_columns)[rows], k)
    return columns


def _best_keys(scores: npt.NDArray[Any], k: int) -> tuple[npt.NDArray[np.float64], int] | None:
    """The ``k`` largest unique keys of each row, best first, and the column mask ``lowest``
    (see :func:`_unique_key_top_k`); None when the columns do not fit in the spare bits."""
    num_columns = scores.shape[-1]
    bits = (num_columns - 1).bit_length()
    if bits > _KEY_BITS:
        return None
    lowest = (1 << bits) - 1
    # The two (T, E) scratch arrays come from the buffer pool: fresh ones would cost a page fault
    # per 4 KiB on first touch, more than all the passes over them (T = 16384, E = 64: 5.2 ms
    # against 1.2 ms). Nothing returned refers to them.
    keys = _empty(scores.shape, np.dtype(np.float64))
    np.copyto(keys, scores)  # exact: a float32 or float16 value is a float64
    keys += 0.0  # -0.0 + 0.0 is 0.0: the two zeros tie
    np.clip(keys, -_KEY_BOUND, _KEY_BOUND, out=keys)
    bits_of = keys.view(np.int64)
    # E - 1 - column (``column ^ lowest``) for every key, then ``column`` for the negative ones:
    # ``bits >> 63`` is -1 exactly for them. (np.where over a broadcast column is far slower.)
    bits_of |= np.arange(num_columns, dtype=np.int64) ^ lowest
    negative = _empty(scores.shape, np.dtype(np.int64))
    np.right_shift(bits_of, 63, out=negative)
    negative &= lowest
    bits_of ^= negative
    del negative
    keys.partition(num_columns - k, axis=-1)
    kept = keys[..., num_columns - k :].copy()
    kept.sort(axis=-1)
    return kept[..., ::-1], lowest  # best first; a NaN, sorted last, comes first


def _key_columns(kept: npt.NDArray[np.float64], lowest: int) -> npt.NDArray[np.int64]:
    """The columns held in the low bits of keys (``lowest - column`` for keys >= 0)."""
    kept_bits = kept.view(np.int64)
    columns: npt.NDArray[np.int64] = (kept_bits & lowest) ^ (~(kept_bits >> 63) & lowest)
    return columns


def _key_values(kept: npt.NDArray[np.float64], lowest: int) -> npt.NDArray[np.float32]:
    """The float32 values of keys: exact, except that ``-0.0`` comes back as ``0.0``."""
    values = (kept.view(np.int64) & ~lowest).view(np.float64)
    with np.errstate(over="ignore"):  # +-2**1000 (a clipped infinity) is +-inf again
        return values.astype(np.float32)


def _finite_best(kept: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Rows whose best key is finite: no NaN, no +inf, not all -inf (a routable row)."""
    return np.abs(kept[..., 0]) < _KEY_BOUND  # NaN compares False


def top_k(scores: npt.NDArray[Any], k: int, *, nan_free: bool = False) -> npt.NDArray[np.intp]:
    """The ``k`` best columns of each row, best first, ties to the lower column.

    Exactly the agnostic ``argsort(-scores, stable=True)[..., :k]`` in ``O(T * E)``. Float32 and
    float16 scores take :func:`_unique_key_top_k`. Other dtypes: ``argpartition`` puts the
    ``k`` best of each row first and the ``(k + 1)``-th best right after them, a sort of the
    ``k`` orders them, and only rows whose ``k + 1`` best values are not strictly decreasing
    (equal values touching the chosen set or its boundary, NaN) are sorted whole with the stable
    sort. Neither needs ``nan_free``.
    """
    num_columns = scores.shape[-1]
    if k >= num_columns or scores.size == 0:
        return _reference_top_k(scores, k)
    if scores.dtype in _KEY_DTYPES:
        columns = _unique_key_top_k(scores, k)
        if columns is not None:
            return columns
    negated = -scores
    partition = np.argpartition(negated, k, axis=-1)[..., : k + 1]
    values = np.take_along_axis(negated, partition, axis=-1)
    order = np.argsort(values[..., :k], axis=-1)
    columns = np.take_along_axis(partition[..., :k], order, axis=-1)
    ranked = np.take_along_axis(values[..., :k], order, axis=-1)
    distinct = np.all(ranked[..., 1:] > ranked[..., :-1], axis=-1) & (
        ranked[..., -1] < values[..., k]
    )
    if not distinct.all():
        rows = np.flatnonzero(~distinct)
        flat = columns.reshape(-1, k)
        flat[rows] = _reference_top_k(scores.reshape(-1, num_columns)[rows], k)
    return columns


def _sigmoid(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The agnostic :func:`~moerouter._agnostic.scores.sigmoid` of NaN-free values, same bits.

    ``where(x >= 0, 1, z) / (1 + z)`` with ``z = exp(-|x|)``, written without ``where``: NumPy's
    ``where`` on a mask of random signs is several times slower than an arithmetic pass. ``-|x|``
    is ``where(x >= 0, -x, x)`` up to the sign of a zero (``exp`` of either is 1), and
    ``maximum(z, x >= 0)`` is 1 for ``x >= 0`` and ``z`` otherwise, since ``0 <= z <= 1``.
    """
    z = np.abs(values)
    np.negative(z, out=z)
    np.exp(z, out=z)
    numerator = np.maximum(z, values >= 0)
    numerator /= 1.0 + z
    return numerator


def router(
    values: npt.NDArray[np.float32],
    k: int,
    *,
    score: str,
    weights: str,
    num_real: int,
    bias: Any = None,
    eligible: Any = None,
) -> Any:
    """The ``router`` slot for NumPy (see :mod:`moerouter.policies._router`).

    One pass finds the row maxima: a row is routable iff its maximum is finite, and the softmax
    shifts by it. A batch with a non-finite row goes to the reference (returns None). Sigmoid
    scores take :func:`_sigmoid` (the reference's bits without its ``where`` passes).
    """
    if values.size == 0:
        return None
    row_max = values.max(axis=-1, keepdims=True)
    finite_rows = np.isfinite(row_max[..., 0])
    if not finite_rows.all():
        return None
    xp = array_namespace(values)
    if score == "softmax":
        probs = np.subtract(values, row_max)  # the agnostic softmax's passes, one allocation
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    else:
        probs = _sigmoid(values)
    selection = values if bias is None else biased_selection(values, probs, bias, xp=xp)
    if eligible is not None:
        selection = eligible(selection)
    choice = top_k(selection, k)
    chosen = np.take_along_axis(selection, choice, axis=-1)
    chosen_logits = chosen if bias is None else np.take_along_axis(values, choice, axis=-1)
    routed = chosen > -np.inf
    if num_real < values.shape[-1]:
        routed &= choice < num_real
    # Every row is finite here; the choices are best first, so the last one is the lowest.
    all_routed = num_real == values.shape[-1] and bool(routed[..., -1].all())
    return RouterResult(
        choice=choice,
        routed=routed,
        weights=chosen_weights(
            chosen_logits,
            None if all_routed else routed,
            probs,
            choice,
            score=score,
            weights=weights,
            xp=xp,
        ),
        probs=probs,
        finite_rows=finite_rows,
        xp=xp,
        all_routed=all_routed,
    )


backend = BackendInfo(
    name="numpy",
    array_library="numpy",
    kernels={
        "make_plan": make_plan,
        "dispatch": dispatch,
        "combine": combine,
        "top_k": top_k,
        "router": router,
    },
    description="NumPy (radix-sort plan, np.take dispatch, CSR or slot-ordered blocked combine)",
)
