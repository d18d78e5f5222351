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
