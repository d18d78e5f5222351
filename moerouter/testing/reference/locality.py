"""Float64 loop references for LocMoE / LocMoE+: locality-aware top-k, affinity routing,
the locality loss, grouped average pooling and affinity scores.

Selections rank the float32 logits with ties to the lower index, as the policies do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import (
    _descending,
    _row_is_finite,
    _softmax_list,
    place_choices,
    token_arrays,
    token_routing,
)
from moerouter.testing.reference.capacity import Capacity, reference_capacity

__all__ = [
    "reference_affinity_routing",
    "reference_affinity_scores",
    "reference_grouped_average_pooling",
    "reference_locality_loss",
    "reference_locality_topk",
]


def reference_locality_topk(
    logits: Any,
    token_nodes: Any,
    *,
    k: int,
    num_nodes: int,
    max_nodes: int = 1,
    normalize: bool = True,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
) -> dict[str, Any]:
    """What :class:`moerouter.policies.LocalityTopK` must return, token by token."""
    values = to_numpy(logits).astype(np.float32)
    if values.ndim == 2:
        values = values[None]
    num_groups, group_size, num_experts = values.shape
    per_node = num_experts // num_nodes
    nodes = to_numpy(token_nodes).reshape(num_groups, group_size)
    choice, expert, weights, probs, finite = token_arrays(num_groups, group_size, k, num_experts)
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s]
            finite[g, s] = _row_is_finite(row)
            # A non-finite row routes nowhere; its raw choices are those of an all-zero row.
            row64 = [float(v) for v in row] if finite[g, s] else [0.0] * num_experts
            p = _softmax_list(row64)
            if finite[g, s]:
                probs[g, s] = p
            own = int(nodes[g, s])
            scores = []
            for m in range(num_nodes):
                block = sorted(p[m * per_node : (m + 1) * per_node], reverse=True)
                scores.append(math.inf if m == own else sum(block[: min(2, per_node)]))
            kept = set(_descending(scores)[:max_nodes])
            masked = [v if e // per_node in kept else -math.inf for e, v in enumerate(row64)]
            picked = _descending(masked)[:k]
            choice[g, s] = picked
            routed = [bool(finite[g, s]) and masked[e] > -math.inf for e in picked]
            if not any(routed):  # every allowed expert is masked (-inf): routes nowhere
                w = [0.0] * k
            elif normalize:
                chosen = [row64[e] for e, r in zip(picked, routed, strict=True) if r]
                top = max(chosen)
                total = sum(math.exp(v - top) for v in chosen)
                w = [
                    math.exp(row64[e] - top) / total if r else 0.0
                    for e, r in zip(picked, routed, strict=True)
                ]
            else:
                w = [p[e] if r else 0.0 for e, r in zip(picked, routed, strict=True)]
            place_choices(expert, weights, (g, s), picked, routed, w)
    capacity = Capacity(capacity_factor, drop_policy, capacity_multiple_of)
    return capacity.routing(num_experts, choice, expert, weights, probs, finite)


def reference_affinity_routing(
    logits: Any, affinity: Any | None, *, capacity_factor: float, capacity_multiple_of: int = 1
) -> dict[str, Any]:
    """What :class:`moerouter.policies.AffinityRouting` must return, token by token."""
    values = to_numpy(logits).astype(np.float32)
    if values.ndim == 2:
        values = values[None]
    num_groups, group_size, num_experts = values.shape
    choice, expert, weights, probs, finite = token_arrays(num_groups, group_size, 1, num_experts)
    if affinity is not None:
        scores = to_numpy(affinity).astype(np.float32).astype(np.float64).reshape(values.shape)
    per_expert = reference_capacity(
        capacity_factor, group_size, 1, num_experts, capacity_multiple_of
    )
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s]
            if not _row_is_finite(row):
                continue
            finite[g, s] = True
            probs[g, s] = _softmax_list([float(v) for v in row])
            best = _descending(row.tolist())[0]
            choice[g, s, 0] = best
            if row[best] > -math.inf:
                expert[g, s, 0] = best
        rank_scores = scores[g] if affinity is not None else probs[g]
        for e in range(num_experts):
            candidates = [s for s in range(group_size) if expert[g, s, 0] == e]
            ranked = sorted(candidates, key=lambda s, e=e: (-rank_scores[s, e], s))
            for position, s in enumerate(ranked):
                if position < per_expert:
                    weights[g, s, 0] = probs[g, s, e]
                else:
                    expert[g, s, 0] = -1
    return token_routing(choice, expert, weights, probs, finite, num_experts)


def reference_locality_loss(
    probs: Any, finite_rows: Any, token_nodes: Any, num_nodes: int
) -> float:
    p = to_numpy(probs).astype(np.float64)
    finite = to_numpy(finite_rows).tolist()
    nodes = to_numpy(token_nodes).tolist()
    num_experts = p.shape[1]
    per_node = num_experts // num_nodes
    tiny = float(np.finfo(np.float32).tiny)
    total, count = 0.0, 0
    for t in range(p.shape[0]):
        if not finite[t]:
            continue
        count += 1
        for e in range(nodes[t] * per_node, (nodes[t] + 1) * per_node):
            total += (math.log(1 / per_node) - math.log(max(p[t, e], tiny))) / per_node
    return total / count if count else 0.0


def reference_grouped_average_pooling(x: Any, num_experts: int) -> np.ndarray:
    values = to_numpy(x).astype(np.float64)
    width = values.shape[-1] // num_experts
    out = np.zeros((*values.shape[:-1], num_experts))
    for index in np.ndindex(*values.shape[:-1]):
        for e in range(num_experts):
            out[index][e] = sum(values[index][e * width + j] for j in range(width)) / width
    return out


def reference_affinity_scores(x: Any, gate_weight: Any) -> np.ndarray:
    tokens = to_numpy(x).astype(np.float32).astype(np.float64)
    rows = to_numpy(gate_weight).astype(np.float32).astype(np.float64)
    out = np.zeros((tokens.shape[0], rows.shape[0]))
    for t in range(tokens.shape[0]):
        for e in range(rows.shape[0]):
            norm = math.sqrt(sum(v * v for v in tokens[t])) * math.sqrt(sum(v * v for v in rows[e]))
            dot = sum(a * b for a, b in zip(tokens[t], rows[e], strict=True))
            out[t, e] = dot / norm if norm > 0 else 0.0
    return out
