"""Soft-MoE dispatch and combine on the array API: dense weighted sums, float32 accumulation."""

from __future__ import annotations

from typing import Any

from moerouter._typing import Array


def _accumulate_dtype(array: Array, *, xp: Any) -> Any:
    # float32 for half and float32 rows, float64 for float64 rows.
    return xp.result_type(array.dtype, xp.float32)


def dispatch(x: Array, dispatch_weights: Array, *, xp: Any) -> Array:
    """Slots ``(..., N, d) = D^T x`` per group, for ``D`` (..., S, N) and ``x`` (..., S, d)."""
    accumulate = _accumulate_dtype(x, xp=xp)
    weights = xp.astype(dispatch_weights, accumulate, copy=False)
    slots = xp.matmul(xp.matrix_transpose(weights), xp.astype(x, accumulate, copy=False))
    return xp.astype(slots, x.dtype, copy=False)


def combine(ye: Array, combine_weights: Array, *, xp: Any) -> Array:
    """Tokens ``(..., S, d) = W ye`` per group, for ``W`` (..., S, N) and ``ye`` (..., N, d)."""
    accumulate = _accumulate_dtype(ye, xp=xp)
    weights = xp.astype(combine_weights, accumulate, copy=False)
    tokens = xp.matmul(weights, xp.astype(ye, accumulate, copy=False))
    return xp.astype(tokens, ye.dtype, copy=False)
