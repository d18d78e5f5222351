"""Float64 loop references for :func:`moerouter.make_plan` (packed and padded to capacity),
:func:`moerouter.dispatch` and :func:`moerouter.combine`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import _plan, _routing

__all__ = [
    "reference_combine",
    "reference_dispatch",
    "reference_make_plan",
    "reference_padded_plan",
]


def reference_make_plan(routing: Any) -> dict[str, Any]:
    """The :class:`moerouter.Plan` of a routing, built with loops.

    Dispatch rows are expert 0's assignments in assignment order, then expert 1's, ..., then the
    assignments of no expert. Each token's combine row lists its assignments in assignment order
    (its dispatch row, or -1 for an assignment of no expert), padded with -1 to ``fan_in``.

    Parameters
    ----------
    routing : Routing or dict
        Any policy's output, or a reference dict.

    Returns
    -------
    dict
        The :class:`moerouter.Plan` fields as NumPy arrays (float64 ``combine_weights``).
    """
    r = _routing(routing)
    expert_ids, token_ids = r["expert_ids"].tolist(), r["token_ids"].tolist()
    weights = r["weights"].astype(np.float64)
    num_tokens, num_experts = r["num_tokens"], r["num_experts"]
    fan_in = r["slots"] if r["layout"] == "token" else num_experts

    order: list[int] = []
    group_sizes = []
    for e in range(num_experts):
        members = [i for i, expert in enumerate(expert_ids) if expert == e]
        group_sizes.append(len(members))
        order.extend(members)
    num_valid = len(order)
    order.extend(i for i, expert in enumerate(expert_ids) if expert < 0)
    inverse = [0] * len(order)
    for row, assignment in enumerate(order):
        inverse[assignment] = row

    combine_rows = np.full((num_tokens, fan_in), -1, np.int32)
    combine_weights = np.zeros((num_tokens, fan_in))
    for t in range(num_tokens):
        mine = [i for i, token in enumerate(token_ids) if token == t]
        if len(mine) > fan_in:
            raise ValueError(f"token {t} has {len(mine)} assignments, more than fan_in={fan_in}")
        for f, i in enumerate(mine):
            if expert_ids[i] >= 0:
                combine_rows[t, f] = inverse[i]
                combine_weights[t, f] = weights[i]
    return {
        "group_sizes": np.array(group_sizes, np.int32),
        "order": np.array(order, np.int32),
        "inverse": np.array(inverse, np.int32),
        "source_tokens": np.array([token_ids[i] for i in order], np.int32),
        "num_valid": np.array(num_valid, np.int32),
        "combine_rows": combine_rows,
        "combine_weights": combine_weights,
        "num_tokens": num_tokens,
        "num_experts": num_experts,
    }


def reference_dispatch(x: Any, plan: Any) -> np.ndarray:
    """Expert-grouped rows: row ``i`` is ``x[source_tokens[i]]`` below ``num_valid``, else zero.

    Parameters
    ----------
    x : array (T, d)
    plan : Plan or dict

    Returns
    -------
    numpy.ndarray (R, d) float64
        An exact copy of the selected rows (every float32/16 value is exact in float64).
    """
    p = _plan(plan)
    x = to_numpy(x).astype(np.float64)
    out = np.zeros((p["order"].shape[0], x.shape[1]))
    for i in range(int(p["num_valid"])):
        out[i] = x[p["source_tokens"][i]]
    return out


def reference_combine(ye: Any, plan: Any) -> np.ndarray:
    """``y[t] = sum_f w[t, f] * ye[rows[t, f]]`` over the plan's combine rows, in float64.

    Entries with row -1 add nothing, whatever ``ye`` holds elsewhere.

    Parameters
    ----------
    ye : array (R, d)
    plan : Plan or dict

    Returns
    -------
    numpy.ndarray (T, d) float64
    """
    p = _plan(plan)
    ye = to_numpy(ye).astype(np.float64)
    rows, weights = p["combine_rows"], p["combine_weights"].astype(np.float64)
    out = np.zeros((rows.shape[0], ye.shape[1]))
    for t in range(rows.shape[0]):
        for f in range(rows.shape[1]):
            if rows[t, f] >= 0:
                out[t] += weights[t, f] * ye[rows[t, f]]
    return out


def reference_padded_plan(routing: Any) -> dict[str, Any]:
    """What ``make_plan(routing, pad_to_capacity=True)`` must return, from the packed reference.

    Expert ``e``'s ``j``-th packed row moves to row ``e * C + j`` with ``C = G * capacity``
    (``capacity`` from the routing, or ``slots`` for the expert layout).
    """
    get = routing.get if isinstance(routing, dict) else lambda name: getattr(routing, name)
    per_group = get("capacity")
    if per_group is None:
        per_group = get("slots")
    capacity = get("num_groups") * per_group
    num_experts = get("num_experts")
    packed = reference_make_plan(routing)
    sizes = packed["group_sizes"].tolist()
    starts = [sum(sizes[:e]) for e in range(num_experts)]
    padded_row = {}  # packed row -> padded row
    order = np.full(num_experts * capacity, -1, np.int32)
    source = np.full(num_experts * capacity, -1, np.int32)
    for e in range(num_experts):
        for j in range(min(sizes[e], capacity)):
            packed_row = starts[e] + j
            padded_row[packed_row] = e * capacity + j
            order[e * capacity + j] = packed["order"][packed_row]
            source[e * capacity + j] = packed["source_tokens"][packed_row]
    expert_ids = to_numpy(get("expert_ids"))
    inverse = np.array(
        [
            padded_row.get(int(packed["inverse"][r]), -1) if expert_ids[r] >= 0 else -1
            for r in range(expert_ids.shape[0])
        ],
        np.int32,
    )
    rows = packed["combine_rows"].copy()
    weights = packed["combine_weights"].copy()
    for index in np.ndindex(rows.shape):
        if rows[index] >= 0:
            rows[index] = padded_row.get(int(rows[index]), -1)
            if rows[index] < 0:
                weights[index] = 0.0
    return {
        "group_sizes": np.minimum(packed["group_sizes"], capacity).astype(np.int32),
        "order": order,
        "inverse": inverse,
        "source_tokens": source,
        "num_valid": np.int32(len(padded_row)),
        "combine_rows": rows,
        "combine_weights": weights,
        "num_tokens": get("num_tokens"),
        "num_experts": num_experts,
        "capacity": capacity,
    }
