"""What every policy does before and after its own rule: check arguments, clean logits, capacity."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj

from moerouter import _registry
from moerouter._agnostic.select import position_in_bucket
from moerouter._arrays import check_index_bound, device_of

Array = Any


def check_bool(value: object, name: str) -> bool:
    """A flag: ``True`` or ``False`` (NumPy's bool too), never a truthy string or number."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_int(value: object, name: str) -> int:
    """Any integer ``operator.index`` takes (``numpy.int64``, a 0-d integer array), not a bool;
    returned as a Python int so that sizes computed from it are exact."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]  # its TypeError is the check
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    number = check_int(value, name)
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_positive_float(value: object, name: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_capacity_factor(value: object, name: str = "capacity_factor") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    return check_positive_float(value, name)


def check_fields(policy: Any) -> None:
    """Check every ``bool`` and ``int`` field of a policy dataclass, as its annotations say.

    Called first by every policy's ``__post_init__`` (range checks follow there): a flag must be
    a bool (``strict="no"`` would otherwise be true), an integer goes through :func:`check_int`
    and is stored as a Python int. ``int | None`` fields may be None.
    """
    for field in dataclasses.fields(policy):
        if not field.init:  # derived in __post_init__, possibly not set yet
            continue
        value = getattr(policy, field.name)
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if kind == "bool":
            object.__setattr__(policy, field.name, check_bool(value, field.name))
        elif kind == "int" or (kind == "int | None" and value is not None):
            object.__setattr__(policy, field.name, check_int(value, field.name))


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


def concrete_all(condition: Array, *, xp: Any) -> bool | None:
    """``bool(xp.all(condition))`` where the values can be read; None while they are traced.

    Traced means inside ``jax.jit`` (reading raises) or ``torch.compile`` (reading would break the
    graph, so it is not tried): an argument check that always runs must not cost a graph break.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(condition, torch.Tensor) and torch.compiler.is_compiling():
        return None
    try:
        return bool(xp.all(condition))
    except Exception:  # a JAX tracer: nothing concrete to read
        return None


def to_float32(values: Array, *, xp: Any) -> Array:
    """``values`` as float32, finite values beyond float32's range saturated to its largest.

    A plain cast turns a float64 1e39 into inf, and its row would then route nowhere although
    every entry is finite. Saturated, the row stays routable and keeps its order, except that
    entries beyond the range tie at the largest float32 (ties go to the lower index). -inf (a
    mask), +inf and NaN (non-finite rows) keep their meaning.
    """
    largest = float(xp.finfo(xp.float32).max)
    if float(xp.finfo(values.dtype).max) > largest:
        saturated = xp.clip(values, min=-largest, max=largest)
        values = xp.where(xp.isfinite(values), saturated, values)
    return xp.astype(values, xp.float32)


def raise_if_unroutable(logits: Array, finite: Array, *, xp: Any) -> None:
    """``strict=True``: raise, naming the first offending row and what is wrong with it, when a
    logits row is non-finite or holds finite values beyond float32's range (concrete values only).

    ``finite`` is :func:`finite_rows` of the float32 logits, (G, S) or (T,).
    """
    rows = xp.reshape(logits, (-1, logits.shape[-1]))
    nonfinite = ~xp.reshape(finite, (-1,))
    largest = float(xp.finfo(xp.float32).max)
    beyond = xp.zeros_like(nonfinite)
    if float(xp.finfo(logits.dtype).max) > largest:
        beyond = xp.any(xp.isfinite(rows) & (xp.abs(rows) > largest), axis=-1)
    try:
        if not bool(xp.any(nonfinite | beyond)):
            return
    except Exception:  # traced (jax.jit): nothing concrete to check
        return

    def first(mask: Array) -> tuple[int, int]:
        count = int(xp.sum(xp.astype(mask, xp.int32)))
        index = int(xp.argmax(xp.astype(mask, xp.int32))) if count else -1
        return count, index

    def name(index: int) -> str:
        if logits.ndim == 2:
            return f"row {index}"
        return f"row ({index // logits.shape[1]}, {index % logits.shape[1]})"

    counts, details = [], []
    count, index = first(nonfinite)
    if count:
        row = rows[index, ...]
        if bool(xp.any(xp.isnan(row))):
            cause = "holds NaN"
        elif bool(xp.any(row == xp.inf)):
            cause = "holds +inf"
        else:
            cause = "is all -inf"
        counts.append(f"{count} non-finite row(s)")
        details.append(f"{name(index)} {cause}")
    count, index = first(beyond)
    if count:
        row = rows[index, ...]
        outside = xp.isfinite(row) & (xp.abs(row) > largest)
        value = float(row[int(xp.argmax(xp.astype(outside, xp.int32)))])
        counts.append(
            f"{count} row(s) with finite values outside float32 range (|x| > {largest:.8g})"
        )
        details.append(f"{name(index)} holds {value:.6g}")
    raise ValueError(f"logits hold {' and '.join(counts)} and strict=True: {'; '.join(details)}")


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


def check_logits(logits: Array, num_columns: int, *, columns_name: str) -> Any:
    """Check that ``logits`` is a real floating (T, E') or (G, S, E') array; its namespace.

    The checks of :func:`clean_logits`, without its float32 copy: a router kernel that cleans
    the rows itself calls this alone.
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
    return xp


def clean_logits(
    logits: Array, num_columns: int, *, columns_name: str, strict: bool
) -> CleanLogits:
    """Validate ``logits`` and bring them to float32 ``(G, S, E')``.

    A row is non-finite when it holds a NaN or +inf, or when every entry is -inf. Such a row routes
    nowhere; ``strict=True`` raises instead, when the values are concrete (not traced). Finite
    values beyond float32's range are saturated (:func:`to_float32`); ``strict=True`` raises on
    them too.
    """
    xp = check_logits(logits, num_columns, columns_name=columns_name)
    values = to_float32(logits, xp=xp)
    if values.ndim == 2:
        values = values[None, ...]
    # Zero tokens (T = 0, or G = 0) is legal: an empty batch routes to empty results.
    num_groups, group_size = int(values.shape[0]), int(values.shape[1])
    finite = finite_rows(values, xp=xp)
    if strict:
        raise_if_unroutable(logits, finite, xp=xp)
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
