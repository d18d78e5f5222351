"""Float64 loop references for the transport-based policies.

Written from the docstrings of :class:`moerouter.SinkhornTokenChoice`,
:class:`moerouter.SinkhornExpertChoice`, :class:`moerouter.BalancedAssignment` and
:class:`moerouter.SparsityConstrainedExpertChoice`, one token, expert or slot at a time in plain
Python float64, sharing no code with :mod:`moerouter._agnostic.transport`. Noise is added in
float32, as the policies do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import _descending, _row_is_finite, place_choices
from moerouter.testing.reference.capacity import Capacity, reference_capacity
from moerouter.testing.reference.expert_choice import _expert_layout

__all__ = [
    "reference_balanced_assignment",
    "reference_sinkhorn_expert_choice",
    "reference_sinkhorn_plan",
    "reference_sinkhorn_token_choice",
    "reference_sparse_transport_plan",
    "reference_sparsity_constrained_expert_choice",
]


def _grouped(logits: Any, noise: Any = None) -> np.ndarray:
    values = to_numpy(logits)
    if values.ndim == 2:
        values = values[None]
    values = values.astype(np.float32)
    if noise is not None:
        extra = to_numpy(noise)
        values = values + (extra[None] if extra.ndim == 2 else extra).astype(np.float32)
    return values


def _lse(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def _softmax(values: list[float], allowed: list[bool]) -> list[float]:
    kept = [v for v, a in zip(values, allowed, strict=True) if a]
    if not kept:
        return [0.0] * len(values)
    top = max(kept)
    exps = [math.exp(v - top) if a else 0.0 for v, a in zip(values, allowed, strict=True)]
    total = sum(exps)
    return [e / total for e in exps]


def _routable(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite rows (G, S) and routable pairs (G, S, E): finite row and logit above -inf."""
    num_groups, group_size, _ = values.shape
    finite = np.zeros((num_groups, group_size), bool)
    for g in range(num_groups):
        for s in range(group_size):
            finite[g, s] = _row_is_finite(values[g, s])
    pairs = finite[..., None] & (values > -np.inf)
    return finite, pairs


def _potentials(
    values: np.ndarray, finite: np.ndarray, epsilon: float, num_iters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled logits L, and potentials u (G, S), v (G, E) of log-domain Sinkhorn.

    Marginals a_s = 1 on finite rows (0 elsewhere), b_e = n / E with n the finite rows of the
    group; v is updated first, then u, ``num_iters`` times from u = 0. A potential whose
    log-sum-exp is -inf (nothing reachable) is 0.
    """
    num_groups, group_size, num_experts = values.shape
    scaled = np.where(finite[..., None], values.astype(np.float64), 0.0) / epsilon
    u = np.zeros((num_groups, group_size))
    v = np.zeros((num_groups, num_experts))
    for g in range(num_groups):
        count = int(finite[g].sum())
        log_b = math.log(max(count, 1)) - math.log(num_experts)
        log_a = [0.0 if finite[g, s] else -math.inf for s in range(group_size)]
        u[g] = 0.0
        for _ in range(num_iters):
            for e in range(num_experts):
                lse = _lse([scaled[g, s, e] + u[g, s] for s in range(group_size)])
                v[g, e] = log_b - lse if lse > -math.inf else 0.0
            for s in range(group_size):
                lse = _lse([scaled[g, s, e] + v[g, e] for e in range(num_experts)])
                u[g, s] = log_a[s] - lse if lse > -math.inf else 0.0
    return scaled, u, v


def reference_sinkhorn_plan(logits: Any, *, epsilon: float = 1.0, num_iters: int = 20) -> Any:
    """What :func:`moerouter.policies.sinkhorn_plan` must return, in float64 loops."""
    values = _grouped(logits)
    finite, _ = _routable(values)
    scaled, u, v = _potentials(values, finite, epsilon, num_iters)
    plan = np.exp(scaled + u[..., None] + v[:, None, :])
    plan = np.where(finite[..., None], plan, 0.0)
    return plan.reshape(to_numpy(logits).shape)


def _probs(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
    probs = np.zeros(values.shape)
    for g in range(values.shape[0]):
        for s in range(values.shape[1]):
            if finite[g, s]:
                row = values[g, s].astype(np.float64).tolist()
                probs[g, s] = _softmax(row, [v > -math.inf for v in row])
    return probs


def _noisy_and_clean(logits: Any, noise: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    clean = _grouped(logits)
    noisy = _grouped(logits, noise)
    finite_clean, _ = _routable(clean)
    finite_noisy, _ = _routable(noisy)
    return clean, noisy, finite_clean & finite_noisy


def reference_sinkhorn_token_choice(
    logits: Any,
    k: int,
    *,
    noise: Any = None,
    epsilon: float = 1.0,
    num_iters: int = 20,
    normalize: bool = False,
    noisy_combine: bool = True,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
) -> dict[str, Any]:
    """What :class:`moerouter.SinkhornTokenChoice` must return, token by token in float64."""
    clean, noisy, finite = _noisy_and_clean(logits, noise)
    num_groups, group_size, num_experts = noisy.shape
    scaled, _, v = _potentials(noisy, finite, epsilon, num_iters)
    probs = _probs(noisy if noisy_combine else clean, finite)
    choice = np.zeros((num_groups, group_size, k), np.int32)
    expert = np.full((num_groups, group_size, k), -1, np.int32)
    weights = np.zeros((num_groups, group_size, k))
    for g in range(num_groups):
        for s in range(group_size):
            if not finite[g, s]:
                choice[g, s] = np.arange(k)
                continue
            score = [scaled[g, s, e] + v[g, e] for e in range(num_experts)]
            picked = _descending(score)[:k]
            choice[g, s] = picked
            routed = [noisy[g, s, e] > -np.inf for e in picked]
            chosen = [probs[g, s, e] if r else 0.0 for e, r in zip(picked, routed, strict=True)]
            total = sum(chosen)
            if normalize and total > 0:
                chosen = [w / total for w in chosen]
            place_choices(expert, weights, (g, s), picked, routed, chosen)
    capacity = Capacity(capacity_factor, drop_policy, capacity_multiple_of)
    return capacity.routing(num_experts, choice, expert, weights, probs, finite)


def reference_sinkhorn_expert_choice(
    logits: Any,
    capacity_factor: float,
    *,
    noise: Any = None,
    epsilon: float = 1.0,
    num_iters: int = 20,
    noisy_combine: bool = True,
    capacity_multiple_of: int = 1,
) -> dict[str, Any]:
    """What :class:`moerouter.SinkhornExpertChoice` must return, expert by expert in float64."""
    clean, noisy, finite = _noisy_and_clean(logits, noise)
    group_size, num_experts = noisy.shape[1:]
    scaled, u, _ = _potentials(noisy, finite, epsilon, num_iters)
    pairs = finite[..., None] & (noisy > -np.inf)
    per_expert = min(
        reference_capacity(capacity_factor, group_size, 1, num_experts, capacity_multiple_of),
        group_size,
    )
    probs = _probs(noisy if noisy_combine else clean, finite)
    return _expert_layout(scaled + u[..., None], probs, pairs, finite, per_expert)


def reference_balanced_assignment(
    logits: Any, *, epsilon: float = 0.05, num_iters: int = 100
) -> dict[str, Any]:
    """What :class:`moerouter.BalancedAssignment` must return: Sinkhorn, then proposal rounds."""
    values = _grouped(logits)
    num_groups, group_size, num_experts = values.shape
    finite, pairs = _routable(values)
    scaled, u, v = _potentials(values, finite, epsilon, num_iters)
    log_plan = scaled + u[..., None] + v[:, None, :]
    per_expert = group_size // num_experts
    assigned = np.full((num_groups, group_size), -1, np.int32)
    for g in range(num_groups):
        load = [0] * num_experts
        for _ in range(num_experts):
            proposals: dict[int, list[int]] = {e: [] for e in range(num_experts)}
            if all(load[e] >= per_expert for e in range(num_experts)):
                break
            for s in range(group_size):
                if not finite[g, s] or assigned[g, s] >= 0:
                    continue
                open_scores = [
                    log_plan[g, s, e] if load[e] < per_expert else -math.inf
                    for e in range(num_experts)
                ]
                proposals[_descending(open_scores)[0]].append(s)
            for e, tokens in proposals.items():
                room = per_expert - load[e]
                ranked = sorted(tokens, key=lambda s, e=e: (-log_plan[g, s, e], s))  # type: ignore[misc]
                for s in ranked[:room]:
                    assigned[g, s] = e
                    load[e] += 1
    num_tokens = num_groups * group_size
    expert = np.full(num_tokens, -1, np.int32)
    choice = np.zeros(num_tokens, np.int32)
    weights = np.zeros(num_tokens)
    for g in range(num_groups):
        for s in range(group_size):
            e = int(assigned[g, s])
            if e < 0:
                continue
            choice[g * group_size + s] = e
            if pairs[g, s, e]:
                expert[g * group_size + s] = e
                x = float(values[g, s, e])
                weights[g * group_size + s] = (
                    1.0 / (1.0 + math.exp(-x)) if x >= 0 else (math.exp(x) / (1.0 + math.exp(x)))
                )
    return {
        "token_ids": np.arange(num_tokens, dtype=np.int32),
        "expert_ids": expert,
        "weights": weights,
        "choice_ids": choice,
        "probs": _probs(values, finite).reshape(num_tokens, num_experts),
        "finite_rows": finite.reshape(-1),
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "layout": "token",
        "slots": 1,
        "num_groups": num_groups,
    }


def _sparse_simplex(values: list[float], max_nonzero: int) -> list[float]:
    """Projection onto {p in simplex, nnz <= k}: the k largest (ties to lower index), sparsemax."""
    keep = _descending(values)[:max_nonzero]
    top = sorted((values[i] for i in keep), reverse=True)
    cumulative, support, theta = 0.0, 0, 0.0
    for j, value in enumerate(top, start=1):
        cumulative += value
        if value - (cumulative - 1.0) / j > 0:
            support, theta = j, (cumulative - 1.0) / j
    out = [0.0] * len(values)
    for i in keep:
        out[i] = max(values[i] - theta, 0.0)
    assert support >= 1
    return out


def reference_sparse_transport_plan(
    similarity: np.ndarray,
    max_nonzero: int,
    *,
    gamma: float = 1.0,
    num_steps: int = 20,
    learning_rate: float = 0.01,
) -> np.ndarray:
    """Semi-dual Adam for sparsity-constrained OT, one group (S, E) at a time, float64."""
    group_size, num_experts = similarity.shape
    b = group_size / num_experts
    scale = gamma * b

    def columns(alpha: list[float]) -> list[list[float]]:
        return [
            _sparse_simplex(
                [(alpha[s] + similarity[s, e]) / scale for s in range(group_size)], max_nonzero
            )
            for e in range(num_experts)
        ]

    alpha = [0.0] * group_size
    first = [0.0] * group_size
    second = [0.0] * group_size
    for step in range(1, num_steps + 1):
        p = columns(alpha)
        for s in range(group_size):
            grad = sum(p[e][s] for e in range(num_experts)) - 1.0
            first[s] = 0.9 * first[s] + 0.1 * grad
            second[s] = 0.999 * second[s] + 0.001 * grad * grad
            m_hat = first[s] / (1 - 0.9**step)
            v_hat = second[s] / (1 - 0.999**step)
            alpha[s] -= learning_rate * m_hat / (math.sqrt(v_hat) + 1e-8)
    p = columns(alpha)
    return np.array([[b * p[e][s] for e in range(num_experts)] for s in range(group_size)])


def reference_sparsity_constrained_expert_choice(
    logits: Any,
    capacity_factor: float,
    *,
    gamma: float = 1.0,
    num_steps: int = 20,
    learning_rate: float = 0.01,
    capacity_multiple_of: int = 1,
) -> dict[str, Any]:
    """What :class:`moerouter.SparsityConstrainedExpertChoice` must return, in float64 loops."""
    values = _grouped(logits)
    num_groups, group_size, num_experts = values.shape
    finite, pairs = _routable(values)
    probs = _probs(values, finite)
    per_expert = min(
        reference_capacity(capacity_factor, group_size, 1, num_experts, capacity_multiple_of),
        group_size,
    )
    plan = np.stack(
        [
            reference_sparse_transport_plan(
                probs[g],
                per_expert,
                gamma=gamma,
                num_steps=num_steps,
                learning_rate=learning_rate,
            )
            for g in range(num_groups)
        ]
    )
    return _expert_layout(plan, probs, pairs, finite, per_expert)
