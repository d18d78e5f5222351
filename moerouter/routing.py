"""Routing decisions and the plan that moves tokens to experts and back.

A policy turns logits into a :class:`Routing`; :func:`make_plan` turns that into a :class:`Plan`;
:func:`dispatch` gathers token rows into expert-grouped rows and :func:`combine` gathers them back,
weighted. Each public function picks a backend plugin's fast kernel from the type of its arrays and
otherwise runs the agnostic array-API version in :mod:`moerouter._agnostic.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from array_api_compat import array_namespace, device

from moerouter import _registry
from moerouter._agnostic import plan as _plan
from moerouter._agnostic import soft as _soft
from moerouter._arrays import check_index_bound, device_of
from moerouter._typing import Array

__all__ = ["Plan", "Routing", "SoftRouting", "combine", "dispatch", "make_plan"]


@dataclass(frozen=True)
class Routing:
    """Which expert each token goes to, with what weight: the output of every policy.

    All arrays belong to one backend and device. ``R`` (the number of assignments) depends only on
    static sizes: ``R = T * k`` in the "token" layout (reshape to ``(T, k)``), ``R = G * E * C`` in
    the "expert" layout (reshape to ``(G, E, C)``).

    Attributes
    ----------
    token_ids : array (R,) int32
        Token of each assignment, in ``[0, T)``.
    expert_ids : array (R,) int32
        Real expert in ``[0, E)``, or -1 where the assignment goes nowhere (null expert, dropped
        by capacity, non-finite logits row, -inf logit).
    weights : array (R,) float32
        Combine weight; exactly 0 where ``expert_ids == -1``. Gradients flow to the logits.
    choice_ids : array (R,) int32
        The raw choice in ``[0, E')`` before dropping and null removal; losses and stats use it.
    probs : array (T, E') float32
        Router probabilities over all ``E' = E + num_null`` columns; 0 on non-finite rows.
    finite_rows : array (T,) bool
        False where a logits row held NaN or +inf, or only -inf: such a row routes nowhere.
    num_tokens : int
        ``T`` (groups flattened).
    num_experts : int
        ``E``, real experts only.
    layout : {"token", "expert"}
        How the ``R`` assignments are ordered.
    slots : int
        ``k`` in the token layout, the capacity ``C`` in the expert layout.
    num_groups : int
        ``G``; 1 for two-dimensional logits.
    capacity : int or None
        Rows each expert may take per group (``C``) when the policy applied a capacity; None
        otherwise. ``make_plan(routing, pad_to_capacity=True)`` lays experts out ``G * C`` rows
        apart with it (for the expert layout ``slots`` is used when this is None).
    """

    token_ids: Array
    expert_ids: Array
    weights: Array
    choice_ids: Array
    probs: Array
    finite_rows: Array
    num_tokens: int
    num_experts: int
    layout: Literal["token", "expert"]
    slots: int
    num_groups: int = 1
    capacity: int | None = None

    @property
    def num_choices(self) -> int:
        """``E'``: real plus null expert columns."""
        return int(self.probs.shape[-1])

    @property
    def fan_in(self) -> int:
        """Upper bound on the assignments of one token: ``k``, or ``E`` for the expert layout."""
        return self.slots if self.layout == "token" else self.num_experts


@dataclass(frozen=True)
class Plan:
    """Where every assignment sits in the expert-grouped buffer, and how to read it back.

    Rows of the dispatched buffer are grouped by expert (expert 0's rows first), then by assignment
    order. Rows past ``num_valid = sum(group_sizes)`` belong to no expert: they are zero after
    :func:`dispatch` and ignored by :func:`combine`, so experts may compute on the first
    ``num_valid`` rows only.

    Attributes
    ----------
    group_sizes : array (E,) int32
        Rows per expert.
    order : array (R,) int32
        Dispatch row ``i`` holds assignment ``order[i]``.
    inverse : array (R,) int32
        Assignment ``r`` sits at dispatch row ``inverse[r]``.
    source_tokens : array (R,) int32
        Token read by dispatch row ``i`` (``token_ids[order[i]]``).
    num_valid : array () int32
        Rows that belong to an expert.
    combine_rows : array (T, F) int32
        Dispatch rows token ``t`` sums, in assignment order; -1 pads tokens with fewer than ``F``.
    combine_weights : array (T, F) float32
        Their weights; 0 where ``combine_rows`` is -1.
    num_tokens : int
        ``T``.
    num_experts : int
        ``E``.
    capacity : int or None
        None for the packed layout above. In a padded plan (``make_plan(routing,
        pad_to_capacity=True)``) the rows each expert owns: ``R = E * capacity`` dispatched
        rows, expert ``e``'s at ``[e * capacity, (e + 1) * capacity)`` (first ``group_sizes[e]``
        of them used, in the packed plan's order), padding rows zero in :func:`dispatch`;
        ``order`` and ``source_tokens`` are -1 on padding rows and ``inverse`` is -1 for
        assignments to no expert. Reshape the buffer to ``(E, capacity, d)`` for batched experts.
    """

    group_sizes: Array
    order: Array
    inverse: Array
    source_tokens: Array
    num_valid: Array
    combine_rows: Array
    combine_weights: Array
    num_tokens: int
    num_experts: int
    capacity: int | None = None

    @property
    def num_rows(self) -> int:
        """``R``, the static length of the dispatched buffer."""
        return int(self.order.shape[0])


@dataclass(frozen=True)
class SoftRouting:
    """Dense dispatch and combine weights of a soft mixture (:class:`moerouter.SoftMoE`).

    ``N = E * P`` slots, expert-major: slot ``n`` belongs to expert ``n // P``. Every token
    contributes to every slot of its group and reads every slot back, so no token is dropped and
    there is no plan: :func:`dispatch` and :func:`combine` take the SoftRouting itself.

    Attributes
    ----------
    dispatch_weights : array (T, N) or (G, S, N) float32
        ``D``: each slot's weights over the tokens of its group (a column sums to 1; 0 for a slot
        no routable token reaches). Gradients flow to the logits.
    combine_weights : array (T, N) or (G, S, N) float32
        ``W``: each token's weights over all slots (a row sums to 1; 0 for a non-finite row).
    finite_rows : array (T,) bool
        False where a logits row held NaN or +inf, or only -inf: such a token feeds no slot and
        its output is zero.
    num_experts : int
        ``E``.
    slots_per_expert : int
        ``P``.
    num_groups : int
        ``G``; 1 for two-dimensional logits.
    """

    dispatch_weights: Array
    combine_weights: Array
    finite_rows: Array
    num_experts: int
    slots_per_expert: int
    num_groups: int = 1

    @property
    def num_slots(self) -> int:
        """``N = E * P``."""
        return self.num_experts * self.slots_per_expert

    @property
    def num_tokens(self) -> int:
        """``T`` (groups flattened)."""
        return int(self.finite_rows.shape[0])


def make_plan(routing: Routing, *, pad_to_capacity: bool = False) -> Plan:
    """Build the dispatch/combine plan of a routing.

    Parameters
    ----------
    routing : Routing
        Output of any policy.
    pad_to_capacity : bool
        Lay the dispatched rows out as ``(E, C_total)``: expert ``e``'s rows at
        ``[e * C_total, (e + 1) * C_total)``, unused rows zero, with ``C_total = G * C`` the
        routing's capacity over its ``G`` groups (GShard, V-MoE and Tutel's static layout, for
        batched expert matmuls). Needs a routing with a capacity (token choice with
        ``capacity_factor``, or expert choice). Runs on the agnostic path on every backend.

    Returns
    -------
    Plan
        Static shapes: ``group_sizes`` (E,), ``order``/``inverse``/``source_tokens`` (R,),
        ``combine_rows``/``combine_weights`` (T, F) with ``F = routing.fan_in``. Padded:
        ``order``/``source_tokens`` (E * C_total,) and ``Plan.capacity == C_total``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    >>> plan = mr.make_plan(mr.TopK(num_experts=3, k=1)(logits))
    >>> plan.group_sizes
    Array([1, 0, 1], dtype=array_api_strict.int32)
    """
    # Imported here: moerouter._validation imports this module's types.
    from moerouter._validation import check_bool, check_routing

    routing = check_routing(routing)

    pad_to_capacity = check_bool(pad_to_capacity, "pad_to_capacity")
    _check_plan_bounds(routing)
    if pad_to_capacity:
        return _padded_plan(routing)
    kernel = _registry.kernel_for("make_plan", routing.expert_ids)
    if kernel is not None:
        plan: Plan = kernel(routing)
        return plan
    xp = array_namespace(routing.token_ids, routing.expert_ids, routing.weights)
    arrays = _packed_plan_arrays(routing, xp=xp, device=device_of(routing.expert_ids))
    return Plan(**arrays, num_tokens=routing.num_tokens, num_experts=routing.num_experts)


def _packed_plan_arrays(routing: Routing, *, xp: Any, device: Any) -> dict[str, Array]:
    """The agnostic plan of ``routing``: its real rows packed by expert."""
    arrays: dict[str, Array] = _plan.plan_arrays(
        routing.token_ids,
        routing.expert_ids,
        routing.weights,
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        fan_in=routing.fan_in,
        token_layout=routing.layout == "token",
        xp=xp,
        device=device,
    )
    return arrays


def _check_plan_bounds(routing: Routing) -> None:
    """Refuse a plan whose int32 indices would wrap (every backend), before building it."""
    check_index_bound("tokens", T=routing.num_tokens)
    check_index_bound("plan rows", R=int(routing.expert_ids.shape[0]))


def _padded_plan(routing: Routing) -> Plan:
    per_group = routing.capacity
    if per_group is None and routing.layout == "expert":
        per_group = routing.slots
    if per_group is None:
        raise ValueError(
            "pad_to_capacity=True needs a routing with a capacity: give the policy a "
            "capacity_factor (or use expert choice)"
        )
    capacity = routing.num_groups * per_group
    check_index_bound("padded plan rows", E=routing.num_experts, **{"(G * C)": capacity})
    _registry.backend_for(routing.expert_ids)  # loads the JAX pytree registration, as policies do
    xp = array_namespace(routing.token_ids, routing.expert_ids, routing.weights)
    device = device_of(routing.expert_ids)
    packed = _packed_plan_arrays(routing, xp=xp, device=device)
    arrays = _plan.pad_to_capacity(
        packed,
        xp.astype(routing.expert_ids, xp.int32),
        capacity=capacity,
        num_experts=routing.num_experts,
        xp=xp,
        device=device,
    )
    return Plan(
        **arrays,
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        capacity=capacity,
    )


def _check_same_backend(array: Array, name: str, plan: Plan) -> Any:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a moerouter.Plan, got {type(plan).__name__}")
    try:
        xp = array_namespace(array, plan.source_tokens)
    except TypeError as error:
        raise TypeError(
            f"{name} is a {type(array).__module__}.{type(array).__name__} but the plan holds "
            f"{type(plan.source_tokens).__module__} arrays: use one backend"
        ) from error
    array_device, plan_device = device(array), device(plan.source_tokens)
    # A traced JAX array (under grad or jit) reports no device: there is nothing to compare.
    if array_device is not None and plan_device is not None and array_device != plan_device:
        raise ValueError(f"{name} is on device {array_device} but the plan is on {plan_device}")
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (rows, features), got shape {tuple(array.shape)}")
    return xp


def _check_soft(array: Array, name: str, routing: SoftRouting, *, tokens: bool) -> Any:
    """The namespace of ``array`` after checking it fits ``routing`` (backend, device, shape)."""
    weights = routing.dispatch_weights
    try:
        xp = array_namespace(array, weights)
    except TypeError as error:
        raise TypeError(
            f"{name} is a {type(array).__module__}.{type(array).__name__} but the soft routing "
            f"holds {type(weights).__module__} arrays: use one backend"
        ) from error
    array_device, routing_device = device(array), device(weights)
    if array_device is not None and routing_device is not None and array_device != routing_device:
        raise ValueError(
            f"{name} is on device {array_device} but the routing is on {routing_device}"
        )
    rows = weights.shape[-2] if tokens else routing.num_slots
    expected = (*tuple(weights.shape[:-2]), rows)
    what = "tokens" if tokens else "slots"
    if array.ndim != len(expected) + 1 or tuple(array.shape[:-1]) != expected:
        raise ValueError(
            f"{name} must have shape {(*expected, 'features')} ({what} of the soft routing), "
            f"got shape {tuple(array.shape)}"
        )
    _check_real_floating(array, name, xp)
    return xp


def _check_real_floating(array: Array, name: str, xp: Any) -> None:
    """Weighted sums need real floating rows: integers would be truncated, complex rejected."""
    try:
        real = xp.isdtype(array.dtype, "real floating")
    except TypeError:  # NumPy cannot classify extension dtypes such as ml_dtypes' bfloat16
        import numpy as np

        try:
            real = np.finfo(array.dtype).bits > 0  # ml_dtypes registers finfo for its floats only
        except (TypeError, ValueError):
            real = False
    if not real:
        raise TypeError(
            f"{name} must be a real floating dtype (float16, bfloat16, float32 or float64), got "
            f"{array.dtype}: its rows are weighted and summed"
        )


def dispatch(x: Array, plan: Plan | SoftRouting) -> Array:
    """Gather token rows into expert-grouped rows.

    Parameters
    ----------
    x : array (T, d), or (G, S, d) for a grouped SoftRouting
        Token features; the backend of the plan. With a Plan, any dtype (rows are copied
        exactly); with a SoftRouting, a real floating dtype (rows are weighted and summed).
    plan : Plan or SoftRouting
        From :func:`make_plan`, or a :class:`SoftRouting` from :class:`moerouter.SoftMoE`.

    Returns
    -------
    array (R, d)
        Row ``i`` is ``x[plan.source_tokens[i]]`` for ``i < num_valid``, zero after; dtype of ``x``.
        Gradients flow back to ``x``.
    array (N, d) or (G, N, d) for a SoftRouting
        Slot ``n`` is ``sum_s dispatch_weights[s, n] * x[s]`` (per group), accumulated in float32
        (float64 for float64 ``x``); dtype of ``x``. Gradients flow to ``x`` and to the logits.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> plan = mr.make_plan(mr.TopK(num_experts=2, k=1)(xp.asarray([[0.0, 1.0], [1.0, 0.0]])))
    >>> mr.dispatch(xp.asarray([[10.0], [20.0]]), plan)
    Array([[20.],
           [10.]], dtype=array_api_strict.float32)
    """
    if isinstance(plan, SoftRouting):
        return _soft.dispatch(x, plan.dispatch_weights, xp=_check_soft(x, "x", plan, tokens=True))
    xp = _check_same_backend(x, "x", plan)
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but the plan routes {plan.num_tokens} tokens")
    if plan.capacity is not None:  # padded layout: the agnostic path on every backend
        return _plan.dispatch_padded(x, plan.source_tokens, xp=xp)
    kernel = _registry.kernel_for("dispatch", x)
    if kernel is not None:
        return kernel(x, plan)
    return _plan.dispatch(x, plan.source_tokens, plan.num_valid, xp=xp)


def combine(ye: Array, plan: Plan | SoftRouting) -> Array:
    """Weighted gather-reduce of expert outputs back to tokens.

    ``y[t] = sum_f combine_weights[t, f] * ye[combine_rows[t, f]]``, accumulated in float32 in a
    fixed order (no atomics): bit-identical run to run, and a token's output does not depend on how
    other tokens were routed.

    For a :class:`SoftRouting`, ``y[s] = sum_n combine_weights[s, n] * ye[n]`` (per group),
    accumulated in float32 (float64 for float64 ``ye``).

    Parameters
    ----------
    ye : array (R, d), or (N, d) / (G, N, d) for a SoftRouting
        Expert outputs in dispatch order, a real floating dtype (float16, bfloat16, float32,
        float64; a TypeError names ``ye`` otherwise); rows past ``num_valid`` are ignored.
    plan : Plan or SoftRouting
        From :func:`make_plan`, or the :class:`SoftRouting` the rows were dispatched with.

    Returns
    -------
    array (T, d), or (G, S, d) for a grouped SoftRouting
        dtype of ``ye``; zero for tokens routed nowhere. Gradients flow to ``ye`` and to the
        routing weights (and through them to the logits).
    """
    if isinstance(plan, SoftRouting):
        xp = _check_soft(ye, "ye", plan, tokens=False)
        return _soft.combine(ye, plan.combine_weights, xp=xp)
    xp = _check_same_backend(ye, "ye", plan)
    _check_real_floating(ye, "ye", xp)
    if ye.shape[0] != plan.num_rows:
        raise ValueError(f"ye has {ye.shape[0]} rows but the plan has {plan.num_rows}")
    if plan.capacity is None:
        kernel = _registry.kernel_for("combine", ye)
        if kernel is not None:
            return kernel(ye, plan)
    return _plan.combine(ye, plan.combine_rows, plan.combine_weights, xp=xp)
