"""The three kernels moerouter's public functions call for ``jax.Array`` inputs.

Gather-only, as MaxText's ``route``/``unroute``: every row of features moves by a gather, and each
backward is a gather with the inverse map plus a fixed-order reduce (``jax.custom_vjp``), never an
``.at[].add`` scatter. XLA's scatter-add sums duplicate indices in an unspecified order and, on
GPU, falls back to compare-and-swap loops under contention (reference/performance.md §6); a
gather-reduce is deterministic and runs at gather speed.

The integer plan fields equal the NumPy backend's exactly; ``dispatch`` is an exact copy;
``combine`` accumulates in float32 (float64 for float64 rows) in slot order, as the agnostic path.
Row movement runs XLA gathers; on a GPU the kernel set :data:`PALLAS` switches it to the Pallas
kernels of :mod:`moerouter_jax._pallas`. The set is off until its tests have passed on a real GPU
(so far only the Pallas interpreter has run them; ``MOEROUTER_UNVERIFIED_KERNELS=jax-pallas``
switches it on): a silently wrong default is worse than a slower one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moerouter import KernelSet, Plan, Routing, _registry
from moerouter._arrays import device_of as _device_of

__all__ = [
    "PALLAS",
    "combine",
    "dispatch",
    "gather_reduce",
    "gather_rows",
    "make_plan",
    "router",
    "top_k",
]

#: The Pallas (Triton-lowered) row movers on GPU; XLA gathers otherwise.
PALLAS = KernelSet(
    name="jax-pallas",
    description=(
        "Pallas dispatch and combine (and their gradients) and the fused top-k router on GPU "
        "(XLA gathers and the agnostic router otherwise)"
    ),
    verified_on="",
)

Array = Any


# ------------------------------------------------------------------------------------------ plan


def device_of(array: Array) -> Any:
    """``device=`` for new ``jnp`` arrays beside ``array``: a JAX array's device (None when traced
    or sharded over several devices); None for a NumPy input, which JAX places by default."""
    return _device_of(array) if isinstance(array, jax.Array) else None


def _stable_order(keys: Array, num_keys: int) -> Array:
    """Indices sorting the non-negative ``keys`` (< ``num_keys``) stably, int32.

    Narrow keys sort faster (fewer radix passes on GPU, half the bytes on CPU).
    """
    narrow = jnp.int16 if num_keys <= jnp.iinfo(jnp.int16).max else jnp.int32
    return jnp.argsort(keys.astype(narrow), stable=True).astype(jnp.int32)


def _inverse(permutation: Array) -> Array:
    """``inverse[permutation[i]] = i``: a collision-free placement of R int32 scalars.

    MaxText's ``invert_permutation``: O(R) instead of a second sort. Only indices move here, never
    feature rows, and no two writes share an index, so there is nothing to sum and nothing racy.
    """
    size, device = permutation.shape[0], device_of(permutation)
    positions = jnp.arange(size, dtype=jnp.int32, device=device)
    inverse = jnp.zeros(size, jnp.int32, device=device)
    return inverse.at[permutation].set(positions, unique_indices=True)


def make_plan(routing: Routing) -> Plan:
    """:func:`moerouter.make_plan` for JAX: stable narrow-key sort, searches, one inverse."""
    num_tokens, num_experts, fan_in = routing.num_tokens, routing.num_experts, routing.fan_in
    token_ids, expert_ids, weights = routing.token_ids, routing.expert_ids, routing.weights
    int32, device = jnp.int32, device_of(expert_ids)
    real = expert_ids >= 0
    key = jnp.where(real, expert_ids, num_experts).astype(int32)  # "no expert" sorts last
    order = _stable_order(key, num_experts + 1)
    inverse = _inverse(order)
    bounds = jnp.searchsorted(
        key[order], jnp.arange(num_experts + 1, dtype=int32, device=device), side="left"
    ).astype(int32)
    group_sizes = bounds[1:] - bounds[:-1]
    masked_rows = jnp.where(real, inverse, -1)
    # The weights are only reshaped or gathered here, so jax.grad carries their gradient back
    # to the router logits.
    masked_weights = jnp.where(real, weights, jnp.zeros_like(weights))
    if routing.layout == "token":
        combine_rows = masked_rows.reshape(num_tokens, fan_in)
        combine_weights = masked_weights.reshape(num_tokens, fan_in)
    else:
        # Each token reads its run of the token-sorted assignments (expert order kept inside a
        # token by the stable sort), padded with -1 to fan_in.
        by_token = _stable_order(token_ids, num_tokens)
        sorted_tokens = token_ids[by_token]
        tokens = jnp.arange(num_tokens, dtype=int32, device=device)
        starts = jnp.searchsorted(sorted_tokens, tokens, side="left").astype(int32)
        ends = jnp.searchsorted(sorted_tokens, tokens, side="right").astype(int32)
        slot = starts[:, None] + jnp.arange(fan_in, dtype=int32, device=device)[None, :]
        present = slot < ends[:, None]
        assignment = by_token[jnp.clip(slot, 0, max(token_ids.shape[0] - 1, 0))]
        combine_rows = jnp.where(present, masked_rows[assignment], -1)
        combine_weights = jnp.where(present, masked_weights[assignment], 0.0).astype(weights.dtype)
    return Plan(
        group_sizes=group_sizes,
        order=order,
        inverse=inverse,
        source_tokens=token_ids[order].astype(int32),
        num_valid=bounds[num_experts],
        combine_rows=combine_rows.astype(int32),
        combine_weights=combine_weights,
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


# ------------------------------------------------------------------------- row movement (XLA)


def _accumulate_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _xla_gather_rows(x: Array, source_tokens: Array, num_valid: Array) -> Array:
    num_rows = source_tokens.shape[0]
    valid = jnp.arange(num_rows, dtype=jnp.int32, device=device_of(x)) < num_valid
    # Rows past num_valid read index T, out of bounds: "fill" writes zeros there in the same pass.
    rows = jnp.where(valid, source_tokens, x.shape[0])
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)


def _xla_gather_reduce(rows_in: Array, combine_rows: Array, weights: Array | None) -> Array:
    accumulate = _accumulate_dtype(rows_in.dtype)
    num_rows = rows_in.shape[0]
    total = jnp.zeros(
        (combine_rows.shape[0], rows_in.shape[1]), accumulate, device=device_of(rows_in)
    )
    # One add per slot, in slot order: XLA fuses the loop into one pass and never reassociates
    # it, so the sum is the agnostic path's, bit for bit, on every run.
    for f in range(combine_rows.shape[1]):
        rows = combine_rows[:, f]
        gathered = jnp.take(
            rows_in, jnp.where(rows >= 0, rows, num_rows), axis=0, mode="fill", fill_value=0
        ).astype(accumulate)
        if weights is not None:
            gathered = weights[:, f, None].astype(accumulate) * gathered
        # A -1 slot adds an exact zero, even where rows of no expert hold inf or NaN.
        total = total + jnp.where((rows >= 0)[:, None], gathered, 0)
    return total.astype(rows_in.dtype)


def platforms(array: Array) -> set[str]:
    """The platforms an array lives on; under tracing (no device yet), JAX's default one."""
    try:
        return {device.platform for device in array.devices()}
    except (AttributeError, jax.errors.ConcretizationTypeError):
        return {jax.default_backend()}


def _use_pallas(array: Array) -> bool:
    return _registry.kernel_set_enabled(PALLAS) and platforms(array) == {"gpu"}


def router(
    values: Array,
    k: int,
    *,
    score: str,
    weights: str,
    num_real: int,
    bias: Any = None,
) -> Any:
    """The ``router`` slot: Pallas's fused top-k router on a GPU while :data:`PALLAS` is on.

    It covers what the fused kernel computes (every column a real expert, no selection bias,
    ``weights`` ``"renormalize"`` or ``"raw"``); every other call, and every call off the GPU,
    returns None for the reference router, whose selection is :func:`top_k`.
    """
    if (
        bias is not None
        or num_real != values.shape[-1]
        or weights not in ("renormalize", "raw")
        or values.size == 0
        or not _use_pallas(values)
    ):
        return None
    from moerouter_jax import _pallas

    return _pallas.router(values, k, score=score, weights=weights)


def gather_rows(x: Array, source_tokens: Array, num_valid: Array) -> Array:
    """``out[i] = x[source_tokens[i]]`` for ``i < num_valid``, zero after (no autodiff rule)."""
    if _use_pallas(x):
        from moerouter_jax import _pallas

        return _pallas.gather_rows(x, source_tokens, num_valid)
    return _xla_gather_rows(x, source_tokens, num_valid)


def gather_reduce(rows_in: Array, combine_rows: Array, weights: Array | None) -> Array:
    """``y[t] = sum_f w[t, f] * rows_in[combine_rows[t, f]]`` over slots ``>= 0``, slot order.

    Without weights, a plain sum: the gradient of dispatch. No autodiff rule of its own.
    """
    if _use_pallas(rows_in):
        from moerouter_jax import _pallas

        return _pallas.gather_reduce(rows_in, combine_rows, weights)
    return _xla_gather_reduce(rows_in, combine_rows, weights)


def _row_weights(combine_rows: Array, combine_weights: Array, num_rows: int) -> Array:
    """The combine weight of every dispatch row (0 for rows no token reads), float32.

    Each dispatch row is read by at most one (token, slot), so this places ``T * F`` scalars
    without collisions: unread slots go to distinct out-of-range indices and are dropped.
    """
    flat_rows, device = combine_rows.reshape(-1), device_of(combine_rows)
    spare = num_rows + jnp.arange(flat_rows.shape[0], dtype=jnp.int32, device=device)
    target = jnp.where(flat_rows >= 0, flat_rows, spare)
    values = combine_weights.reshape(-1).astype(_accumulate_dtype(combine_weights.dtype))
    return (
        jnp.zeros(num_rows, values.dtype, device=device)
        .at[target]
        .set(values, mode="drop", unique_indices=True)
    )


# --------------------------------------------------------------------------- differentiable ops


@jax.custom_vjp
def _dispatch(x: Array, source_tokens: Array, num_valid: Array, combine_rows: Array) -> Array:
    return gather_rows(x, source_tokens, num_valid)


def _dispatch_fwd(
    x: Array, source_tokens: Array, num_valid: Array, combine_rows: Array
) -> tuple[Array, Array]:
    return gather_rows(x, source_tokens, num_valid), combine_rows


def _dispatch_bwd(combine_rows: Array, grad: Array) -> tuple[Any, ...]:
    # A token's gradient is the sum of its copies' gradients: gather with the inverse map and
    # reduce over the k copies, in slot order.
    return gather_reduce(grad, combine_rows, None), None, None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(
    ye: Array,
    combine_weights: Array,
    combine_rows: Array,
    source_tokens: Array,
    num_valid: Array,
) -> Array:
    return gather_reduce(ye, combine_rows, combine_weights)


def _combine_fwd(
    ye: Array,
    combine_weights: Array,
    combine_rows: Array,
    source_tokens: Array,
    num_valid: Array,
) -> tuple[Array, tuple[Array, ...]]:
    out = gather_reduce(ye, combine_rows, combine_weights)
    return out, (ye, combine_weights, combine_rows, source_tokens, num_valid)


def _combine_bwd(residuals: tuple[Array, ...], grad: Array) -> tuple[Any, ...]:
    ye, combine_weights, combine_rows, source_tokens, num_valid = residuals
    accumulate = _accumulate_dtype(ye.dtype)
    num_rows = ye.shape[0]
    # grad_ye[i] = w_i * grad_y[token of row i]: a gather of grad_y (dispatch), then a scale.
    row_weight = _row_weights(combine_rows, combine_weights, num_rows)
    gathered = gather_rows(grad, source_tokens, num_valid).astype(accumulate)
    grad_ye = (row_weight[:, None] * gathered).astype(ye.dtype)
    # grad_w[t, f] = <grad_y[t], ye[rows[t, f]]>: a gather of ye by the combine map.
    grad_y = grad.astype(accumulate)
    columns = []
    for f in range(combine_rows.shape[1]):
        rows = combine_rows[:, f]
        read = jnp.take(ye, jnp.where(rows >= 0, rows, num_rows), axis=0, mode="fill", fill_value=0)
        dot = jnp.sum(read.astype(accumulate) * grad_y, axis=1)
        columns.append(jnp.where(rows >= 0, dot, 0))
    grad_weights = jnp.stack(columns, axis=1).astype(combine_weights.dtype)
    return grad_ye, grad_weights, None, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def dispatch(x: Array, plan: Plan) -> Array:
    """:func:`moerouter.dispatch` for JAX: one gather; its gradient is a gather-reduce."""
    return _dispatch(x, plan.source_tokens, plan.num_valid, plan.combine_rows)


def combine(ye: Array, plan: Plan) -> Array:
    """:func:`moerouter.combine` for JAX: slot-ordered gather-reduce, float32 accumulation.

    Gradients flow to ``ye`` (a gather of the output gradient) and to ``plan.combine_weights``
    (and through them to the routing weights and logits).
    """
    return _combine(ye, plan.combine_weights, plan.combine_rows, plan.source_tokens, plan.num_valid)


def _reference_top_k(scores: Array, k: int) -> Array:
    return jnp.argsort(-scores, axis=-1, stable=True)[..., :k].astype(jnp.int32)


def _lax_top_k(scores: Array, k: int) -> Array:
    # -0.0 becomes 0.0: lax.top_k ranks 0.0 above -0.0, the reference treats them as equal.
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)
    return jax.lax.top_k(scores, k)[1]


def top_k(scores: Array, k: int, *, nan_free: bool = False) -> Array:
    """The ``k`` best columns of each row, best first, ties to the lower column (int32).

    ``jax.lax.top_k`` already returns equal values lower index first (XLA's TopK breaks ties by
    index, ``-inf`` included; ``tests/kernels/test_fast_selection.py`` checks it), so it equals the
    reference ``argsort(-scores, stable=True)`` with no per-row fallback, under ``jax.jit`` too.
    Two differences are fixed: ``-0.0`` is made ``0.0``, and NaN, which ``lax.top_k`` ranks
    first and the reference last, is ranked as ``-inf`` by a first ``top_k`` while a second one,
    on a key that puts ``-inf`` before NaN, orders the unfinite tail of each row (skipped when
    the caller promises ``nan_free`` scores). Branch-free, so it also runs inside
    ``shard_map``. ``lax.top_k`` on float32 is used as is: on an integer key it is about 9x
    slower on XLA's CPU backend (measured, T = 4096, E = 64).
    """
    if scores.dtype != jnp.float32:
        return _reference_top_k(scores, k)
    if nan_free:
        return _lax_top_k(scores, k)
    nan = jnp.isnan(scores)
    lowest = jnp.asarray(-jnp.inf, dtype=scores.dtype)
    finite_first = _lax_top_k(jnp.where(nan, lowest, scores), k)
    # Key of the tail: -inf (2) before NaN (1), each by index; other entries (0) last.
    tail_key = jnp.where(scores == -jnp.inf, 2.0, jnp.where(nan, 1.0, 0.0)).astype(jnp.float32)
    tail = jax.lax.top_k(tail_key, k)[1]
    above = jnp.sum((scores > -jnp.inf) & ~nan, axis=-1, keepdims=True, dtype=jnp.int32)
    slot = jnp.arange(k, dtype=jnp.int32)
    from_tail = jnp.clip(slot - above, 0, k - 1)
    return jnp.where(slot < above, finite_first, jnp.take_along_axis(tail, from_tail, axis=-1))
