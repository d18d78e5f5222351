"""Plan, dispatch and combine on the array API: the reference every fast kernel must match."""

from __future__ import annotations

from typing import Any

from moerouter._agnostic.select import inverse_permutation
from moerouter._typing import Array


def plan_arrays(
    token_ids: Array,
    expert_ids: Array,
    weights: Array,
    *,
    num_tokens: int,
    num_experts: int,
    fan_in: int,
    token_layout: bool,
    xp: Any,
    device: Any,
) -> dict[str, Array]:
    """Every array of a :class:`moerouter.Plan`, from a routing's assignments.

    Dispatch order is a stable sort by expert, with "no expert" (-1) sorting last, so rows are
    grouped by expert and keep assignment order inside a group. Combine reads, for every token, the
    dispatch rows of its assignments in assignment order (``combine_rows``, -1 where the token has
    fewer than ``fan_in`` real assignments): a fixed-order gather-reduce, no scatter.
    """
    int32 = xp.int32
    real = expert_ids >= 0
    sort_key = xp.where(real, expert_ids, xp.asarray(num_experts, dtype=int32, device=device))
    order = xp.argsort(sort_key, stable=True)
    inverse = inverse_permutation(order, xp=xp)
    sorted_key = xp.take(sort_key, order)
    edges = xp.arange(num_experts + 1, dtype=int32, device=device)
    bounds = xp.searchsorted(sorted_key, edges, side="left")
    group_sizes = xp.astype(bounds[1:] - bounds[:-1], int32)

    masked_weights = xp.where(real, weights, xp.zeros_like(weights))
    minus_one = xp.asarray(-1, dtype=int32, device=device)
    masked_rows = xp.where(real, xp.astype(inverse, int32), minus_one)
    if token_layout:
        # Assignments are already token-major: token t owns slots t*k .. t*k + k - 1.
        combine_rows = xp.reshape(masked_rows, (num_tokens, fan_in))
        combine_weights = xp.reshape(masked_weights, (num_tokens, fan_in))
    else:
        # Expert layout: sort assignments by token (stable, so expert order is kept inside a
        # token) and read each token's run, padded to fan_in.
        by_token = xp.argsort(token_ids, stable=True)
        sorted_tokens = xp.take(token_ids, by_token)
        tokens = xp.arange(num_tokens, dtype=int32, device=device)
        starts = xp.searchsorted(sorted_tokens, tokens, side="left")
        ends = xp.searchsorted(sorted_tokens, tokens, side="right")
        slot = starts[:, None] + xp.arange(fan_in, dtype=starts.dtype, device=device)[None, :]
        present = slot < ends[:, None]
        last = max(token_ids.shape[0] - 1, 0)
        assignment = xp.take(by_token, xp.reshape(xp.clip(slot, 0, last), (-1,)))
        assignment = xp.reshape(assignment, (num_tokens, fan_in))
        flat_rows = xp.take(masked_rows, xp.reshape(assignment, (-1,)))
        flat_weights = xp.take(masked_weights, xp.reshape(assignment, (-1,)))
        combine_rows = xp.where(present, xp.reshape(flat_rows, (num_tokens, fan_in)), minus_one)
        combine_weights = xp.where(
            present,
            xp.reshape(flat_weights, (num_tokens, fan_in)),
            xp.zeros((num_tokens, fan_in), dtype=weights.dtype, device=device),
        )
    return {
        "group_sizes": group_sizes,
        "order": xp.astype(order, int32),
        "inverse": xp.astype(inverse, int32),
        "source_tokens": xp.astype(xp.take(token_ids, order), int32),
        "num_valid": xp.astype(bounds[num_experts], int32),
        "combine_rows": combine_rows,
        "combine_weights": combine_weights,
    }


def dispatch(x: Array, source_tokens: Array, num_valid: Array, *, xp: Any) -> Array:
    """Rows of ``x`` in dispatch order; rows past ``num_valid`` are zero.

    Those rows read an appended zero row, so one gather writes the whole output (masking a
    gathered copy afterwards would pass over all ``R`` rows a second time).
    """
    num_tokens, where = x.shape[0], _device(x)
    padded = xp.concat([x, xp.zeros((1, x.shape[1]), dtype=x.dtype, device=where)], axis=0)
    valid = xp.arange(source_tokens.shape[0], dtype=num_valid.dtype, device=where) < num_valid
    past_end = xp.asarray(num_tokens, dtype=source_tokens.dtype, device=where)
    rows = xp.where(valid, source_tokens, past_end)
    return xp.take(padded, rows, axis=0)


def combine(ye: Array, combine_rows: Array, combine_weights: Array, *, xp: Any) -> Array:
    """``y[t] = sum_f w[t, f] * ye[rows[t, f]]``, accumulated in float32 (float64 for float64
    rows) in the order of ``f``.

    Entries with ``rows == -1`` contribute exactly nothing, even when ``ye`` holds inf or NaN
    in rows that belong to no expert.
    """
    num_tokens, fan_in = combine_rows.shape
    accumulate = xp.result_type(ye.dtype, xp.float32)  # float32, or float64 for float64 rows
    zero = xp.zeros((), dtype=accumulate, device=_device(ye))
    total = xp.zeros((num_tokens, ye.shape[1]), dtype=accumulate, device=_device(ye))
    for f in range(fan_in):
        rows = combine_rows[:, f]
        present = rows >= 0
        gathered = xp.take(ye, xp.where(present, rows, xp.zeros_like(rows)), axis=0)
        gathered = xp.where(present[:, None], xp.astype(gathered, accumulate, copy=False), zero)
        total = total + combine_weights[:, f][:, None] * gathered
    return xp.astype(total, ye.dtype, copy=False)


def _device(array: Array) -> Any:
    from moerouter._arrays import device_of

    return device_of(array)


def pad_to_capacity(
    packed: dict[str, Array],
    expert_ids: Array,
    *,
    capacity: int,
    num_experts: int,
    xp: Any,
    device: Any,
) -> dict[str, Array]:
    """A packed plan's arrays re-laid out with expert ``e``'s rows at ``[e*C, (e+1)*C)``.

    Row ``j`` of expert ``e`` holds the same assignment as row ``j`` of that expert in the packed
    plan, so the padded buffer is the packed one with gaps. Rows an expert does not fill are
    padding: ``order`` and ``source_tokens`` are -1 there, :func:`dispatch_padded` writes zeros
    and :func:`combine` never reads them. An assignment past row ``C`` of its expert (impossible
    for a routing whose policy applied this capacity) is not dispatched and weighs nothing.
    """
    int32 = xp.int32
    group_sizes = packed["group_sizes"]
    starts = xp.astype(xp.cumulative_sum(group_sizes) - group_sizes, int32)
    capacity_array = xp.asarray(capacity, dtype=int32, device=device)
    minus_one = xp.asarray(-1, dtype=int32, device=device)
    num_assignments = packed["order"].shape[0]
    # Where each packed row goes: expert e's j-th packed row to e*C + j (-1 past capacity or
    # past the valid rows).
    packed_rows = xp.arange(num_assignments, dtype=int32, device=device)
    real = expert_ids >= 0
    row_expert = xp.take(
        xp.where(real, expert_ids, xp.zeros_like(expert_ids)), packed["order"]
    )  # (R,) expert of each packed row (garbage past num_valid)
    within = packed_rows - xp.take(starts, row_expert)
    placed = (packed_rows < packed["num_valid"]) & (within < capacity)
    padded_of_packed = xp.where(placed, row_expert * capacity + within, minus_one)

    # The padded buffer, row by row: expert e, slot j reads packed row starts[e] + j if j fits.
    slot = xp.arange(capacity, dtype=int32, device=device)[None, :]
    fills = xp.reshape(slot < xp.minimum(group_sizes, capacity_array)[:, None], (-1,))
    source_row = xp.reshape(starts[:, None] + slot, (-1,))
    source_row = xp.where(fills, source_row, xp.zeros_like(source_row))
    if num_assignments:
        order = xp.where(fills, xp.take(packed["order"], source_row), minus_one)
        source_tokens = xp.where(fills, xp.take(packed["source_tokens"], source_row), minus_one)
    else:  # no assignment to read (no tokens): every row is padding
        order = source_tokens = xp.full(fills.shape, -1, dtype=int32, device=device)

    inverse = xp.take(padded_of_packed, packed["inverse"])
    combine_rows = packed["combine_rows"]
    present = combine_rows >= 0
    remapped = xp.take(padded_of_packed, xp.reshape(xp.where(present, combine_rows, 0), (-1,)))
    remapped = xp.reshape(remapped, combine_rows.shape)
    keep = present & (remapped >= 0)
    return {
        "group_sizes": xp.astype(xp.minimum(group_sizes, capacity_array), int32),
        "order": order,
        "inverse": xp.where(real, inverse, minus_one),
        "source_tokens": source_tokens,
        "num_valid": xp.astype(xp.sum(xp.astype(placed, int32)), int32),
        "combine_rows": xp.where(keep, remapped, minus_one),
        "combine_weights": xp.where(
            keep, packed["combine_weights"], xp.zeros_like(packed["combine_weights"])
        ),
    }


def dispatch_padded(x: Array, source_tokens: Array, *, xp: Any) -> Array:
    """Rows of ``x`` at ``source_tokens``; zero rows where it is -1 (padding)."""
    num_tokens, where = x.shape[0], _device(x)
    padded = xp.concat([x, xp.zeros((1, x.shape[1]), dtype=x.dtype, device=where)], axis=0)
    zero_row = xp.asarray(num_tokens, dtype=source_tokens.dtype, device=where)
    rows = xp.where(source_tokens >= 0, source_tokens, zero_row)
    return xp.take(padded, rows, axis=0)
