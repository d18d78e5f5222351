"""Every argument check of the core, in one place: one message per mistake, naming the parameter.

Scalars (flags, sizes, factors, choices), policy dataclass fields, arrays (rank, dtype, shape,
one backend), a :class:`~moerouter.Routing` and its token ``mask``, and the logits a policy
consumes (:func:`clean_logits`: rank, columns, dtype, non-finite rows, ``strict=True``, int32
index bounds). Checks never read array values where that would cost a host synchronisation, and
never under a trace (:func:`concrete_all`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj

from moerouter import _registry
from moerouter._agnostic.scores import finite_rows, to_float32
from moerouter._arrays import check_index_bound, device_of
from moerouter._typing import Array, Namespace

if TYPE_CHECKING:
    from moerouter.routing import Routing


# --------------------------------------------------------------------------------------------
# Scalars and policy fields


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


def check_int_at_least(value: object, name: str, minimum: int = 1) -> int:
    """A Python or NumPy integer (not a bool, not an array) >= ``minimum``, as a Python int.

    Stricter than :func:`check_int`: the workload generators and the simulator take sizes
    from the command line and configuration files, never from arrays.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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


def check_required_capacity_factor(value: object, name: str = "capacity_factor") -> float:
    """A capacity factor that may not be None (expert-layout policies always have a capacity)."""
    if value is None:
        raise TypeError(f"{name} must be a number, got None")
    return cast(float, check_capacity_factor(value, name))


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


def check_real(
    value: object, name: str, *, positive: bool = False, nonnegative: bool = False
) -> float:
    """A finite Python ``int`` or ``float`` (not a bool), > 0 with ``positive``, >= 0 with
    ``nonnegative``; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if positive:
        condition, bad = "a finite number > 0", value <= 0
    elif nonnegative:
        condition, bad = "a finite number >= 0", value < 0
    else:
        condition, bad = "a finite number", False
    if not math.isfinite(value) or bad:
        raise ValueError(f"{name} must be {condition}, got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Arrays


def is_array(value: object) -> bool:
    """Whether ``value`` is an array of an array-API library.

    A plain bool, not array-api-compat's ``TypeGuard``, so that mypy keeps ``Array`` as ``Any``.
    """
    return bool(is_array_api_obj(value))


def namespace(*arrays: Any, xp: Namespace) -> Namespace:
    """``xp`` if given, else the common namespace of ``arrays`` (mixed backends raise)."""
    if xp is not None:
        return xp
    try:
        return array_namespace(*arrays)
    except TypeError as error:  # mixed backends, or a non-array
        raise TypeError(f"all arrays must come from one array library: {error}") from None


def check_array(value: object, name: str) -> None:
    if not is_array_api_obj(value):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")


def float_array(value: Any, name: str, *, ndim: tuple[int, ...], xp: Namespace) -> Array:
    """``value`` checked to be a real floating array of one of ``ndim`` ranks, as float32."""
    check_array(value, name)
    if value.ndim not in ndim:
        ranks = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {ranks} dimensions, got shape {tuple(value.shape)}")
    if not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    return xp.astype(value, xp.float32)


def bool_array(value: Any, name: str, *, shape: tuple[int, ...], xp: Namespace) -> Array:
    """``value`` checked to be a bool array of ``shape``."""
    check_array(value, name)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype != xp.bool:
        raise TypeError(f"{name} must be a bool array, got {value.dtype}")
    return value


def check_shape(value: Any, name: str, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")


def class_labels(labels: Any, name: str, *, num_rows: int, xp: Namespace) -> Array:
    """Integer labels of shape ``(num_rows,)``.

    Their range is not checked here: that would cost a host synchronisation (and a graph break
    under ``torch.compile``) on every call.
    :func:`~moerouter._agnostic.select.pick_columns` turns an out-of-range label into a NaN
    instead, so a bad label shows in the loss without a sync.
    """
    check_array(labels, name)
    if tuple(labels.shape) != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},), got {tuple(labels.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array, got {labels.dtype}")
    return labels


def same_backend(*named: tuple[str, Array]) -> Namespace:
    """The namespace of ``(name, array)`` pairs that must all be arrays of one backend; the
    error names the offending parameter."""
    for name, value in named:
        if not is_array_api_obj(value):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    try:
        return array_namespace(*(value for _, value in named))
    except TypeError as error:
        names = " and ".join(name for name, _ in named)
        raise TypeError(f"{names} must be arrays of one backend") from error


def float_namespace(*named: tuple[str, Array]) -> Namespace:
    """The namespace of ``(name, array)`` pairs that must all be real floating arrays of one
    backend; the error names the offending parameter."""
    xp = same_backend(*named)
    for name, value in named:
        if not xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    return xp


def check_floating(value: Array, name: str, *, min_ndim: int | None = None) -> Array:
    """``value`` checked to be a real floating array of at least ``min_ndim`` dimensions
    (its dtype kept)."""
    if not is_array(value):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    xp = array_namespace(value)
    if not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    if min_ndim is not None and value.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {value.shape}"
        )
    return value


def check_same_shape(name: str, value: Array, reference: Array, reference_name: str) -> None:
    """``value`` must have the shape of ``reference`` (draws of the logits' shape, ...)."""
    if tuple(value.shape) != tuple(reference.shape):
        raise ValueError(
            f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
            f"got {tuple(value.shape)}"
        )


# --------------------------------------------------------------------------------------------
# A Routing and its token mask (losses, stats, methods)


def check_routing(routing: object) -> Routing:
    """``routing`` itself, checked to be a :class:`~moerouter.Routing`."""
    # Imported here: moerouter.routing imports this module.
    from moerouter.routing import Routing

    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moerouter.Routing, got {type(routing).__name__}")
    return routing


def flat_mask(mask: Array, shapes: tuple[tuple[int, ...], ...], xp: Namespace) -> Array | None:
    """``mask`` checked against the accepted token shapes and flattened to (T,); None stays None."""
    if mask is None:
        return None
    if not is_array_api_obj(mask):
        raise TypeError(f"mask must be a bool array, got {type(mask).__name__}")
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        accepted = " or ".join(str(s) for s in dict.fromkeys(shapes))
        raise ValueError(f"mask must have shape {accepted}, got shape {tuple(mask.shape)}")
    return xp.reshape(mask, (-1,))


def mask_shapes(routing: Routing, mask: Array) -> tuple[tuple[int, ...], ...]:
    """The shapes a token mask of ``routing`` may have: (T,) or (G, S)."""
    if routing.num_groups:
        group_size = routing.num_tokens // routing.num_groups
    else:  # G = 0 groups of any size S: every (0, S) mask fits.
        group_size = int(mask.shape[-1]) if getattr(mask, "ndim", 0) == 2 else 0
    return ((routing.num_tokens,), (routing.num_groups, group_size))


def valid_tokens(routing: Routing, mask: Array, xp: Namespace) -> Array:
    """(T,) bool: finite logits rows that the mask (if any) keeps."""
    flat = flat_mask(mask, mask_shapes(routing, mask), xp)
    return routing.finite_rows if flat is None else routing.finite_rows & flat


# --------------------------------------------------------------------------------------------
# Logits, as every policy takes them


def concrete_all(condition: Array, *, xp: Namespace) -> bool | None:
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


def raise_if_unroutable(logits: Array, finite: Array, *, xp: Namespace) -> None:
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


@dataclass(frozen=True)
class CleanLogits:
    """Logits as a policy consumes them: float32, grouped, non-finite rows neutralised."""

    values: Array  # (G, S, E') float32; bad rows replaced by zeros so no NaN reaches a gradient
    finite_rows: Array  # (G, S) bool
    num_groups: int
    group_size: int
    xp: Namespace

    @property
    def device(self) -> Any:
        """Where the policy builds its arrays: the logits' device."""
        return device_of(self.values)


def check_logits(logits: Array, num_columns: int, *, columns_name: str) -> Namespace:
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
