"""Float64 loop references for the adaptive-compute policies and their losses.

Written from the docstrings of :class:`moerouter.TopP`, :class:`moerouter.ReLURouting` and
:class:`moerouter.CausalExpertChoice`, sharing no code with the policies. Decisions that compare a
sum or a probability with a threshold agree with a float32 backend when no such value lies within
float32 rounding of the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import (
    _grouped_float32,
    _ranked_columns,
    _row_is_finite,
    _softmax,
    place_choices,
    token_arrays,
)
from moerouter.testing.reference.capacity import Capacity

__all__ = [
    "reference_causal_expert_choice",
    "reference_relu_l1_loss",
    "reference_relu_routing",
    "reference_routed_load_balancing",
    "reference_top_p",
]


def _token_routing(
    values: np.ndarray,
    num_experts: int,
    slots: int,
    decide: Any,
    *,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
) -> dict[str, Any]:
    """Token-layout routing from ``decide(row) -> (probs, picked, routed, weights)`` per finite
    row; capacity k-major, then token order ("position") or descending probability ("probs")."""
    num_groups, group_size, num_columns = values.shape
    choice, expert, weights, probs, finite = token_arrays(
        num_groups, group_size, slots, num_columns
    )
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s]
            if not _row_is_finite(row):
                continue
            finite[g, s] = True
            probs[g, s], picked, routed, row_weights = decide(row)
            choice[g, s] = picked
            place_choices(expert, weights, (g, s), picked, routed, row_weights)
    capacity = Capacity(capacity_factor, drop_policy)
    return capacity.routing(num_experts, choice, expert, weights, probs, finite)


def reference_top_p(
    logits: Any,
    p: float,
    max_k: int,
    *,
    normalize: bool = False,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
) -> dict[str, Any]:
    """What :class:`moerouter.TopP` must return, token by token in float64.

    A token takes its experts in descending logit order (ties to the lower index) while the
    probability mass already taken is below ``p`` (the first always; ``p = 1``: all ``max_k``),
    never a ``-inf`` logit; weights are the softmax probabilities (renormalised over the taken
    experts with ``normalize``).
    """
    values = _grouped_float32(logits)
    num_experts = values.shape[-1]

    def decide(row: np.ndarray) -> tuple[np.ndarray, list[int], list[bool], list[float]]:
        probs = _softmax(row)
        picked = _ranked_columns(row)[:max_k]
        routed, mass = [], 0.0
        for slot, column in enumerate(picked):
            routed.append((slot == 0 or p >= 1.0 or mass < p) and row[column] > -math.inf)
            mass += probs[column]
        weights = [probs[j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
        total = sum(weights)
        if normalize and total > 0:
            weights = [w / total for w in weights]
        return probs, picked, routed, weights

    return _token_routing(
        values,
        num_experts,
        max_k,
        decide,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
    )


def reference_routed_load_balancing(routing: Any) -> float:
    """:func:`moerouter.losses.routed_load_balancing`: ``E * sum_e f_e P_e`` with ``f_e`` the
    share of routed assignments (valid tokens) and ``P_e`` the mean probability over them."""
    token_ids = to_numpy(routing.token_ids)
    expert_ids = to_numpy(routing.expert_ids)
    probs = to_numpy(routing.probs).astype(np.float64)
    finite = to_numpy(routing.finite_rows)
    num_experts = routing.num_experts
    counts = np.zeros(num_experts)
    for t, e in zip(token_ids.tolist(), expert_ids.tolist(), strict=True):
        if e >= 0 and finite[t]:
            counts[e] += 1
    tokens = max(int(finite.sum()), 1)
    mean_probs = probs[finite][:, :num_experts].sum(axis=0) / tokens
    share = counts / counts.sum() if counts.sum() > 0 else counts
    return float(num_experts * np.sum(share * mean_probs))


def reference_relu_routing(
    logits: Any, max_k: int, *, capacity_factor: float | None = None, drop_policy: str = "position"
) -> dict[str, Any]:
    """What :class:`moerouter.ReLURouting` must return, token by token in float64.

    Gates ``max(l, 0)``; the token's ``max_k`` largest logits (ties to the lower index) take
    slots, and a slot routes when its logit is positive, weighted by its gate.
    """
    values = _grouped_float32(logits)

    def decide(row: np.ndarray) -> tuple[np.ndarray, list[int], list[bool], list[float]]:
        gates = np.maximum(row.astype(np.float64), 0.0)
        picked = _ranked_columns(row)[:max_k]
        routed = [bool(row[j] > 0) for j in picked]
        return gates, picked, routed, [gates[j] for j in picked]

    return _token_routing(
        values,
        values.shape[-1],
        max_k,
        decide,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
    )


def reference_relu_l1_loss(routing: Any, target_k: int | None = None) -> dict[str, float]:
    """ReMoE's L1 penalty (plain or load-balanced), sparsity and cut fraction, with loops."""
    gates = to_numpy(routing.probs).astype(np.float64)
    finite = to_numpy(routing.finite_rows)
    num_experts = routing.num_experts
    tokens = [t for t in range(gates.shape[0]) if finite[t]]
    count = max(len(tokens), 1)
    active = [sum(1 for t in tokens if gates[t, e] > 0) for e in range(num_experts)]
    total = 0.0
    for t in tokens:
        for e in range(num_experts):
            scale = 1.0 if target_k is None else num_experts * active[e] / (target_k * count)
            total += scale * gates[t, e]
    positive = sum(active)
    slotted = 0
    for t, c in zip(
        to_numpy(routing.token_ids).tolist(), to_numpy(routing.choice_ids).tolist(), strict=True
    ):
        if finite[t] and gates[t, c] > 0:
            slotted += 1
    return {
        "l1": total / count,
        "sparsity": 1.0 - positive / (count * num_experts),
        "cut_fraction": (positive - slotted) / max(positive, 1),
    }


def reference_causal_expert_choice(
    logits: Any, *, thresholds: Any = None, predictor_logits: Any = None
) -> dict[str, Any]:
    """What :class:`moerouter.CausalExpertChoice` must return at inference, token by token.

    ``E`` slots in descending logit order (ties to the lower index); expert ``e`` routes when
    ``softmax(l)_e >= thresholds[e]`` (threshold mode) or ``predictor_logits[t, e] > 0``
    (predictor mode), never at a ``-inf`` logit; weight ``softmax(l)_e``.
    """
    values = _grouped_float32(logits)
    num_groups, group_size, num_experts = values.shape
    if thresholds is not None:
        passes_of = to_numpy(thresholds).astype(np.float32).astype(np.float64)
    else:
        predicted = to_numpy(predictor_logits).astype(np.float32).reshape(-1, num_experts)
    # _token_routing calls ``decide`` on the finite rows in token order.
    finite_tokens = iter(
        g * group_size + s
        for g in range(num_groups)
        for s in range(group_size)
        if _row_is_finite(values[g, s])
    )

    def decide(row: np.ndarray) -> tuple[np.ndarray, list[int], list[bool], list[float]]:
        token = next(finite_tokens)
        probs = _softmax(row)
        picked = _ranked_columns(row)
        if thresholds is not None:
            passes = [bool(probs[e] >= passes_of[e]) for e in picked]
        else:
            passes = [bool(predicted[token, e] > 0) for e in picked]
        routed = [p and bool(row[e] > -math.inf) for p, e in zip(passes, picked, strict=True)]
        return probs, picked, routed, [probs[e] for e in picked]

    return _token_routing(values, num_experts, num_experts, decide)
