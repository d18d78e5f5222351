"""Expert parallelism over a JAX mesh axis: ``shard_map`` with a static-capacity ``all_to_all``.

Call :func:`dispatch` and :func:`combine` inside a function mapped with ``jax.shard_map`` over
a mesh axis (the expert-parallel axis). Each shard routes its own tokens with the same policy and
builds its own :class:`moerouter.Plan`; experts sit in contiguous blocks of ``E / n`` along the
axis (shard ``i`` holds experts ``i * E_local .. (i + 1) * E_local - 1``), so the expert
weights are sharded with ``P(axis)`` on their expert dimension.

Shapes under ``jit`` are static, so each shard sends ``capacity`` rows per expert, padded with
zeros: ``E * capacity`` rows of width ``d`` per shard, whatever the routing. Rows past the
capacity in an expert's group are dropped (their output is zero), as with token dropping. The
per-(shard, expert) counts travel too, so the received rows are regrouped into the moerouter
layout: grouped by local expert with the real rows first and the padding after
``sum(group_sizes)``, which a grouped expert kernel may skip. ``jax.lax.all_to_all`` is
differentiable (its transpose is the reverse all-to-all), so ``jax.grad`` flows to the tokens,
the expert weights and the router.

``jax.lax.ragged_all_to_all`` (exact, unpadded sizes) exists in the installed JAX (0.10.2) but
XLA:CPU rejects it ("HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so it could not
be tested here and is not used.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

import moerouter as mr

__all__ = ["Exchange", "combine", "dispatch", "experts_per_rank"]


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """``E / n``: how many contiguous experts each shard of the expert axis holds.

    Raises
    ------
    ValueError
        When ``num_experts`` is not a positive multiple of ``world_size``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if num_experts < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} must be a positive multiple of the world size "
            f"{world_size}: expert parallelism places num_experts / world_size experts per rank"
        )
    return num_experts // world_size


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Exchange:
    """What :func:`dispatch` delivered to this shard, and what :func:`combine` needs back.

    Attributes
    ----------
    rows : array (E * C, d)
        Rows for this shard's experts: grouped by local expert (then by source shard), real
        rows first, zero padding after ``sum(group_sizes)``.
    group_sizes : array (E_local,) int32
        Real rows per local expert (at most ``n * C`` each).
    plan : Plan
        This shard's plan, for the final combine.
    rows_real : array () int32
        Real rows this shard sent (at most ``sum(plan.group_sizes)``; fewer when some were
        dropped by the capacity).
    rows_dropped : array () int32
        This shard's real rows that did not fit the capacity.
    regroup : array (E * C,) int32
        ``rows[i]`` is received slot ``regroup[i]``; :func:`combine` inverts it.
    """

    rows: Any
    group_sizes: Any
    plan: mr.Plan
    rows_real: Any
    rows_dropped: Any
    regroup: Any


def _check_capacity(capacity: object) -> int:
    """``capacity`` as an int >= 1; ``True`` is refused rather than taken as 1."""
    if isinstance(capacity, bool):
        raise TypeError("capacity must be an int, got bool")
    try:
        value = operator.index(capacity)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}") from None
    if value < 1:
        raise ValueError(f"capacity must be >= 1, got {value}")
    return value


def _slots(plan: mr.Plan, capacity: int) -> tuple[Any, Any]:
    """Dispatch row of each (expert, slot) or -1 for padding; rows kept per expert."""
    sizes = plan.group_sizes
    starts = jnp.cumsum(sizes) - sizes
    slot = jnp.arange(capacity, dtype=jnp.int32)
    filled = slot[None, :] < sizes[:, None]
    source_rows = jnp.where(filled, starts[:, None] + slot[None, :], -1)
    return source_rows.reshape(-1), jnp.minimum(sizes, capacity)


def dispatch(x: Any, plan: mr.Plan, *, axis_name: str, capacity: int) -> Exchange:
    """Send this shard's routed rows to the shards that hold their experts (inside ``shard_map``).

    Parameters
    ----------
    x : array (T, d)
        This shard's tokens.
    plan : Plan
        :func:`moerouter.make_plan` of this shard's routing over all ``E`` experts.
    axis_name : str
        The mesh axis the experts are spread over.
    capacity : int
        Rows per expert sent by each shard (static, an int >= 1); more are dropped. ``T * k``
        never drops.

    Returns
    -------
    Exchange
        ``rows`` and ``group_sizes`` go to the local experts; their output goes to
        :func:`combine`.

    A shard with no tokens (``T = 0``) or whose tokens all route nowhere (padding rows with
    non-finite logits) sends ``E * capacity`` zero rows like any other, still serves its
    experts, and gets a ``(T, d)`` output from :func:`combine`. Every shard runs one traced
    program, so the settings cannot differ between shards.

    Examples
    --------
    .. skip-example
    .. code-block:: python

       def layer(x, gate, w_in, w_out):          # x, w_in, w_out: this shard's blocks
           plan = mr.make_plan(router(x @ gate))
           exchange = distributed.dispatch(x, plan, axis_name="ep", capacity=32)
           ye = experts(exchange.rows, exchange.group_sizes, w_in, w_out)
           return distributed.combine(ye, exchange, axis_name="ep")

       y = jax.shard_map(layer, mesh=mesh, in_specs=(P("ep"), P(), P("ep"), P("ep")),
                         out_specs=P("ep"))(x, gate, w_in, w_out)
    """
    capacity = _check_capacity(capacity)
    if plan.capacity is not None:
        raise ValueError(
            "plan must be packed (make_plan without pad_to_capacity): its real rows are sent by "
            "expert, capacity rows each"
        )
    world = jax.lax.axis_size(axis_name)
    local = experts_per_rank(plan.num_experts, world)
    width = x.shape[1]
    xe = mr.dispatch(x, plan)
    source_rows, kept = _slots(plan, capacity)
    padded = jnp.concatenate([xe, jnp.zeros((1, width), xe.dtype)])
    send = padded[jnp.where(source_rows >= 0, source_rows, xe.shape[0])]

    # Block i of the send buffer (shard i's experts) goes to shard i; block s of what arrives
    # came from shard s.
    received = jax.lax.all_to_all(
        send.reshape(world, local * capacity, width), axis_name, 0, 0, tiled=False
    )
    recv_kept = jax.lax.all_to_all(kept.reshape(world, local), axis_name, 0, 0, tiled=False)

    # Slot (source s, local expert j, c) is real when c < recv_kept[s, j]; regroup by expert
    # with the real rows first (stable sort keeps source order inside an expert).
    slot = jnp.arange(capacity, dtype=jnp.int32)
    real = slot[None, None, :] < recv_kept[:, :, None]  # (world, local, C)
    expert = jnp.broadcast_to(jnp.arange(local, dtype=jnp.int32)[None, :, None], real.shape)
    key = jnp.where(real, expert, local).reshape(-1)
    regroup = jnp.argsort(key, stable=True).astype(jnp.int32)
    rows = received.reshape(-1, width)[regroup]
    return Exchange(
        rows=rows,
        group_sizes=recv_kept.sum(0).astype(jnp.int32),
        plan=plan,
        rows_real=kept.sum().astype(jnp.int32),
        rows_dropped=(plan.group_sizes - kept).sum().astype(jnp.int32),
        regroup=regroup,
    )


def combine(ye: Any, exchange: Exchange, *, axis_name: str) -> Any:
    """Send expert outputs back to their tokens' shards and combine them there.

    Parameters
    ----------
    ye : array (E * C, d)
        The local experts' outputs for ``exchange.rows``, in the same order.
    exchange : Exchange
        From :func:`dispatch`.
    axis_name : str
        The mesh axis given to :func:`dispatch`.

    Returns
    -------
    array (T, d)
        :func:`moerouter.combine` of this shard's tokens; dropped rows contribute zero.
    """
    if ye.ndim != 2 or ye.shape[0] != exchange.rows.shape[0]:
        raise ValueError(
            f"ye must have shape ({exchange.rows.shape[0]}, d) like exchange.rows, "
            f"got {tuple(ye.shape)}"
        )
    plan = exchange.plan
    world = jax.lax.axis_size(axis_name)
    width = ye.shape[1]
    num_slots = ye.shape[0]
    capacity = num_slots // plan.num_experts
    inverse = (
        jnp.zeros_like(exchange.regroup)
        .at[exchange.regroup]
        .set(jnp.arange(num_slots, dtype=jnp.int32))
    )
    back = ye[inverse].reshape(world, num_slots // world, width)
    returned = jax.lax.all_to_all(back, axis_name, 0, 0, tiled=False).reshape(-1, width)

    # Dispatch row i of expert e at position p reads slot e * C + p when p < C.
    sizes = plan.group_sizes
    ends = jnp.cumsum(sizes)
    row = jnp.arange(plan.num_rows, dtype=jnp.int32)
    expert = jnp.searchsorted(ends, row, side="right")
    real = expert < plan.num_experts
    expert = jnp.minimum(expert, plan.num_experts - 1)
    position = row - (ends[expert] - sizes[expert])
    kept = real & (position < capacity)
    padded = jnp.concatenate([returned, jnp.zeros((1, width), returned.dtype)])
    slot = jnp.where(kept, expert * capacity + position, num_slots)
    return mr.combine(padded[slot], plan)
