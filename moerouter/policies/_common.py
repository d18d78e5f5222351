"""What every policy does before and after its own rule: check arguments, clean logits, capacity."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from moerouter import _registry
from moerouter._agnostic.select import position_in_bucket
from moerouter._arrays import check_index_bound, device_of

Array = Any


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_capacity_factor(value: object, name: str = "capacity_factor") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    return check_positive_float(value, name)


def check_k(value: object, num_columns: int, columns_name: str = "num_experts") -> int:
    k = check_positive_int(value, "k")
    if k > num_columns:
        raise ValueError(f"k must be <= {columns_name} = {num_columns}, got {k}")
    return k


def check_choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


CAPACITY_ROUNDINGS = ("exact", "megatron")


def capacity(
    capacity_factor: float,
    tokens: int,
    per_token: int,
    experts: int,
    multiple_of: int,
    minimum: int = 0,
    rounding: str = "exact",
) -> int:
    """``max(ceil(capacity_factor * tokens * per_token / experts), minimum)`` rounded up to
    ``multiple_of`` (Megatron-Core applies its ``min_capacity`` before vmoe-style rounding).

    ``rounding="exact"`` takes the ceiling of the exact product; ``"megatron"`` the ceiling of
    Megatron-Core's float64 expression ``(tokens * k / experts) * capacity_factor``
    (``moe_utils.py::get_capacity``), which float noise can push one row higher:
    ``get_capacity(50, 3, 0.9)`` is 16 where the exact ceiling is 15.
    """
    if rounding == "megatron":
        raw = math.ceil((tokens * per_token / experts) * capacity_factor)
    else:
        # Round away float noise: 1.1 * 50 is 55.00000000000001 in floats, and must give 55.
        raw = math.ceil(round(capacity_factor * tokens * per_token / experts, 9))
    raw = max(raw, minimum)
    return max(multiple_of, -(-raw // multiple_of) * multiple_of)


def finite_rows(values: Array, *, xp: Any) -> Array:
    """Rows that can be routed: no NaN, no +inf, and at least one entry above -inf."""
    no_nan_or_inf = xp.all(xp.isfinite(values) | (values == -xp.inf), axis=-1)
    return no_nan_or_inf & xp.any(values > -xp.inf, axis=-1)


@dataclass(frozen=True)
class CleanLogits:
    """Logits as a policy consumes them: float32, grouped, non-finite rows neutralised."""

    values: Array  # (G, S, E') float32; bad rows replaced by zeros so no NaN reaches a gradient
    finite_rows: Array  # (G, S) bool
    num_groups: int
    group_size: int
    xp: Any

    @property
    def device(self) -> Any:
        """Where the policy builds its arrays: the logits' device."""
        return device_of(self.values)


def clean_logits(
    logits: Array, num_columns: int, *, columns_name: str, strict: bool
) -> CleanLogits:
    """Validate ``logits`` and bring them to float32 ``(G, S, E')``.

    A row is non-finite when it holds a NaN or +inf, or when every entry is -inf. Such a row routes
    nowhere; ``strict=True`` raises instead, when the values are concrete (not traced).
    """
    if not is_array_api_obj(logits):
        raise TypeError(f"logits must be an array, got {type(logits).__name__}")
    xp = array_namespace(logits)
    # Load the array library's plugin now, before a Routing is returned: the JAX plugin makes
    # Routing a pytree so that a policy can run under jax.jit.
    _registry.backend_for(logits)
    if logits.ndim not in (2, 3):
        raise ValueError(
            "logits must have shape (tokens, experts) or (groups, tokens, experts), "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[-1] != num_columns:
        raise ValueError(
            f"logits have {logits.shape[-1]} columns in their last dimension, "
            f"but {columns_name} = {num_columns}"
        )
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits must be a real floating dtype, got {logits.dtype}")
    values = xp.astype(logits, xp.float32)
    if values.ndim == 2:
        values = values[None, ...]
    # Zero tokens (T = 0, or G = 0) is legal: an empty batch routes to empty results.
    num_groups, group_size = int(values.shape[0]), int(values.shape[1])
    finite = finite_rows(values, xp=xp)
    if strict:
        try:
            all_finite = bool(xp.all(finite))
        except Exception:  # traced (jax.jit): nothing concrete to check
            all_finite = True
        if not all_finite:
            bad = int(xp.sum(xp.astype(~finite, xp.int32)))
            raise ValueError(f"logits hold {bad} non-finite row(s) and strict=True")
    values = xp.where(finite[..., None], values, xp.zeros_like(values))
    return CleanLogits(values, finite, num_groups, group_size, xp)


def _token_grid(logits: Array) -> tuple[int, int] | None:
    """``(G, S)`` of logits (T, E') or (G, S, E'), read from the shape alone; None when they
    are not an array of that rank (:func:`clean_logits` then says why)."""
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) not in (2, 3):
        return None
    return (1, int(shape[0])) if len(shape) == 2 else (int(shape[0]), int(shape[1]))


def check_token_layout_bounds(
    logits: Array, k: int, *, num_experts: int, with_capacity: bool
) -> None:
    """Refuse a token-layout routing whose int32 indices would wrap, from the logits' shape,
    before anything is built (even the float32 copy): ``T * k`` assignments, and with capacity
    the ``G * (E + 1)`` buckets of :func:`drop_over_capacity`."""
    grid = _token_grid(logits)
    if grid is None:
        return
    num_groups, group_size = grid
    check_index_bound("assignments", T=num_groups * group_size, k=k)
    if with_capacity:
        check_index_bound("capacity buckets", G=num_groups, **{"(E + 1)": num_experts + 1})


def check_expert_layout_bounds(
    logits: Array, *, num_experts: int, capacity: Callable[[int], int]
) -> None:
    """Refuse an expert-layout routing whose int32 indices would wrap, from the logits' shape,
    before anything is built: ``T`` token ids and ``G * E * C`` expert slots, with ``C =
    capacity(S)``."""
    grid = _token_grid(logits)
    if grid is None:
        return
    num_groups, group_size = grid
    check_index_bound("tokens", T=num_groups * group_size)
    check_index_bound("expert slots", G=num_groups, E=num_experts, C=capacity(group_size))


def drop_over_capacity(
    expert_ids: Array, priority: Array, *, num_experts: int, capacity: int, xp: Any, device: Any
) -> Array:
    """Drop the assignments that do not fit in their expert's buffer of ``capacity`` rows.

    ``expert_ids`` is ``(G, N)`` (-1: no real expert); ``priority`` is ``(G, N)``, a permutation of
    ``range(N)`` per group, 0 first served. Returns ``expert_ids`` with dropped entries set to -1.
    """
    num_groups = expert_ids.shape[0]
    # Put every group's assignments in priority order, then count earlier assignments to the same
    # (group, expert) bucket; "no expert" gets a bucket of its own that is never dropped from.
    serve_order = xp.argsort(priority, axis=-1, stable=True)
    served = xp.take_along_axis(expert_ids, serve_order, axis=-1)
    group = xp.arange(num_groups, dtype=xp.int32, device=device)[:, None]
    no_expert = xp.asarray(num_experts, dtype=served.dtype, device=device)
    bucket = group * (num_experts + 1) + xp.where(served >= 0, served, no_expert)
    position = xp.reshape(
        position_in_bucket(xp.reshape(bucket, (-1,)), xp=xp, device=device), served.shape
    )
    kept_served = (position < capacity) & (served >= 0)
    kept = xp.take_along_axis(kept_served, xp.argsort(serve_order, axis=-1, stable=True), axis=-1)
    return xp.where(kept, expert_ids, xp.asarray(-1, dtype=expert_ids.dtype, device=device))
