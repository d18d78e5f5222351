"""What every policy does after its own rule: capacity, and dropping what does not fit.

The argument checks and the logits cleaning every policy starts with live in
:mod:`moerouter._validation`, the float32 score primitives in :mod:`moerouter._agnostic.scores`;
their names stay importable from here for code written against the earlier layout.
"""

from __future__ import annotations

import math
from typing import Any

from moerouter._agnostic.scores import finite_rows, to_float32
from moerouter._agnostic.select import position_in_bucket
from moerouter._typing import Array, Device, Namespace
from moerouter._validation import (
    CleanLogits,
    check_bool,
    check_capacity_factor,
    check_choice,
    check_expert_layout_bounds,
    check_fields,
    check_int,
    check_k,
    check_positive_float,
    check_positive_int,
    check_required_capacity_factor,
    check_token_layout_bounds,
    clean_logits,
    concrete_all,
    raise_if_unroutable,
)

__all__ = [
    "CAPACITY_ROUNDINGS",
    "Array",
    "CleanLogits",
    "capacity",
    "check_bool",
    "check_capacity_factor",
    "check_capacity_options",
    "check_capacity_policy_fields",
    "check_choice",
    "check_expert_layout_bounds",
    "check_fields",
    "check_int",
    "check_k",
    "check_positive_float",
    "check_positive_int",
    "check_token_layout_bounds",
    "clean_logits",
    "concrete_all",
    "drop_over_capacity",
    "expert_capacity",
    "finite_rows",
    "raise_if_unroutable",
    "to_float32",
]


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


def check_capacity_options(policy: Any, drop_policies: tuple[str, ...]) -> None:
    """The checks of a token-choice policy's optional capacity, for the fields it has.

    ``capacity_factor`` None or > 0, ``capacity_multiple_of >= 1``, ``min_capacity >= 0``,
    ``drop_policy`` one of ``drop_policies``, ``capacity_rounding`` one of
    :data:`CAPACITY_ROUNDINGS`, in that order.
    """
    check_capacity_factor(policy.capacity_factor)
    check_positive_int(policy.capacity_multiple_of, "capacity_multiple_of")
    if hasattr(policy, "min_capacity"):
        check_positive_int(policy.min_capacity, "min_capacity", minimum=0)
    check_choice(policy.drop_policy, "drop_policy", drop_policies)
    if hasattr(policy, "capacity_rounding"):
        check_choice(policy.capacity_rounding, "capacity_rounding", CAPACITY_ROUNDINGS)


def check_capacity_policy_fields(policy: Any) -> None:
    """The checks that open ``__post_init__`` of every policy whose capacity is required.

    Field types (:func:`check_fields`), ``num_experts >= 1``, a capacity factor that is a number
    > 0, and ``capacity_multiple_of >= 1``; the policy checks its own other fields after.
    """
    check_fields(policy)
    check_positive_int(policy.num_experts, "num_experts")
    check_required_capacity_factor(policy.capacity_factor)
    check_positive_int(policy.capacity_multiple_of, "capacity_multiple_of")


def expert_capacity(policy: Any, group_size: int, capacity_factor: float | None = None) -> int:
    """``C``, the tokens each expert of an expert-layout ``policy`` takes from a group.

    ``ceil(cf * group_size / num_experts)`` rounded up to ``policy.capacity_multiple_of``, then
    capped at ``group_size`` (an expert cannot take a token twice); ``capacity_factor``, when
    given, replaces ``policy.capacity_factor``.
    """
    if capacity_factor is None:
        capacity_factor = policy.capacity_factor
    full = capacity(capacity_factor, group_size, 1, policy.num_experts, policy.capacity_multiple_of)
    return min(full, group_size)


def drop_over_capacity(
    expert_ids: Array,
    priority: Array,
    *,
    num_experts: int,
    capacity: int,
    xp: Namespace,
    device: Device,
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
