"""The pieces every reference shares: NumPy copies of a Routing or Plan, float32 grouped
logits, finite rows, ranking with ties to the lower index, softmax and sigmoid in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy

__all__ = ["as_dict"]

ROUTING_ARRAYS = ("token_ids", "expert_ids", "weights", "choice_ids", "probs", "finite_rows")


ROUTING_STATICS = ("num_tokens", "num_experts", "layout", "slots", "num_groups")


PLAN_ARRAYS = (
    "group_sizes",
    "order",
    "inverse",
    "source_tokens",
    "num_valid",
    "combine_rows",
    "combine_weights",
)


def as_dict(obj: Any, names: tuple[str, ...], statics: tuple[str, ...] = ()) -> dict[str, Any]:
    """NumPy copies of the named array fields of a Routing, Plan or dict, plus its static fields."""
    get = obj.get if isinstance(obj, dict) else lambda name: getattr(obj, name)
    out: dict[str, Any] = {name: to_numpy(get(name)) for name in names}
    for name in statics:
        out[name] = get(name)
    return out


def _routing(routing: Any) -> dict[str, Any]:
    return as_dict(routing, ROUTING_ARRAYS, ROUTING_STATICS)


def _plan(plan: Any) -> dict[str, Any]:
    return as_dict(plan, PLAN_ARRAYS, ("num_tokens", "num_experts"))


def _grouped_float32(logits: Any) -> np.ndarray:
    values = to_numpy(logits)
    if values.ndim == 2:
        values = values[None]
    return values.astype(np.float32)


def _row_is_finite(row: np.ndarray) -> bool:
    """No NaN, no +inf, and at least one entry above -inf."""
    ok = all(math.isfinite(v) or v == -math.inf for v in row.tolist())
    return ok and any(v > -math.inf for v in row.tolist())


def _descending(values: list[float]) -> list[int]:
    """Indices of ``values`` from largest to smallest value, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def _ranked_columns(row: np.ndarray) -> list[int]:
    """Columns of a float32 row from largest to smallest value, ties to the lower column."""
    return _descending(row.tolist())


def _softmax(row: np.ndarray) -> np.ndarray:
    values = row.astype(np.float64)
    top = max(v for v in values if v > -math.inf)
    exps = np.array([0.0 if v == -math.inf else math.exp(v - top) for v in values])
    probs: np.ndarray = exps / exps.sum()
    return probs


def _sigmoid(row: np.ndarray) -> np.ndarray:
    out = []
    for v in row.astype(np.float64).tolist():
        # Written in the stable form for either sign: exp never overflows.
        out.append(1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v)))
    return np.array(out)


def _softmax_list(row: list[float]) -> list[float]:
    finite = [v for v in row if v > -math.inf]
    top = max(finite)
    exps = [0.0 if v == -math.inf else math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def place_choices(
    expert: np.ndarray,
    weights: np.ndarray,
    cell: tuple[int, int],
    picked: list[int],
    routed: list[bool],
    slot_weights: list[float],
) -> None:
    """Write token ``cell = (g, s)``'s routed choices into (G, S, k) ``expert`` and ``weights``,
    in place; a slot that is not routed keeps what it had (expert -1, weight 0)."""
    for slot, column in enumerate(picked):
        if routed[slot]:
            expert[(*cell, slot)] = column
            weights[(*cell, slot)] = slot_weights[slot]


def token_routing(
    choice: np.ndarray,
    expert: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    finite: np.ndarray,
    num_experts: int,
    capacity: int | None = None,
) -> dict[str, Any]:
    """The dict of a token-layout routing from (G, S, k) choices, experts and weights, (G, S, E')
    probabilities and (G, S) finite rows."""
    num_groups, group_size, k = choice.shape
    num_tokens = num_groups * group_size
    return {
        "token_ids": np.repeat(np.arange(num_tokens, dtype=np.int32), k),
        "expert_ids": expert.reshape(-1),
        "weights": weights.reshape(-1),
        "choice_ids": choice.reshape(-1),
        "probs": probs.reshape(num_tokens, -1),
        "finite_rows": finite.reshape(-1),
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "layout": "token",
        "slots": k,
        "num_groups": num_groups,
        "capacity": capacity,
    }


def token_arrays(
    num_groups: int, group_size: int, k: int, num_columns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Empty (G, S, k) choices, experts and weights, (G, S, E') probabilities and (G, S) finite
    rows of a token-layout reference: no row routed, the raw choices those of an all-zero row."""
    choice = np.tile(np.arange(k, dtype=np.int32), (num_groups, group_size, 1))
    expert = np.full((num_groups, group_size, k), -1, np.int32)
    weights = np.zeros((num_groups, group_size, k))
    probs = np.zeros((num_groups, group_size, num_columns))
    return choice, expert, weights, probs, np.zeros((num_groups, group_size), bool)
