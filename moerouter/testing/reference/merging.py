"""Float64 loop references for MC-SMoE (:mod:`moerouter.methods.merging`): routing
statistics, expert similarity, grouping, merging and the expert-id remap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import _descending

__all__ = [
    "reference_expert_similarity",
    "reference_group_experts",
    "reference_merge_experts",
    "reference_remap_expert_ids",
    "reference_routing_statistics",
]


def reference_routing_statistics(
    batches: list[tuple[Any, Any]], num_experts: int, *, count: str = "all"
) -> dict[str, np.ndarray]:
    """Usage counts and the logits Gram matrix over ``(routing, logits or None)`` batches."""
    usage = np.zeros(num_experts)
    gram = np.zeros((num_experts, num_experts))
    tokens = 0.0
    for routing, logits in batches:
        expert_ids = to_numpy(routing.expert_ids)
        if count == "top1":
            expert_ids = expert_ids.reshape(routing.num_tokens, routing.slots)[:, 0]
        for e in expert_ids.tolist():
            if e >= 0:
                usage[e] += 1
        if logits is None:
            rows = to_numpy(routing.probs)[:, :num_experts].astype(np.float64)
        else:
            values = to_numpy(logits).astype(np.float32)
            rows = values.reshape(-1, values.shape[-1])[:, :num_experts].astype(np.float64)
        finite_rows = to_numpy(routing.finite_rows)
        for t in range(rows.shape[0]):
            if not finite_rows[t] or not np.all(np.isfinite(rows[t])):
                continue
            tokens += 1
            for i in range(num_experts):
                for j in range(num_experts):
                    gram[i, j] += rows[t, i] * rows[t, j]
    return {"usage": usage, "logit_gram": gram, "num_tokens": np.float64(tokens)}


def reference_expert_similarity(gram: Any) -> np.ndarray:
    values = to_numpy(gram).astype(np.float64)
    size = values.shape[0]
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            norm = math.sqrt(values[i, i]) * math.sqrt(values[j, j])
            cosine = values[i, j] / norm if norm > 0 else 0.0
            out[i, j] = (min(1.0, max(-1.0, cosine)) + 1) / 2
    return out


def reference_group_experts(
    frequencies: Any, similarity: Any, num_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dominant experts by usage; others join their most similar dominant expert."""
    usage = to_numpy(frequencies).tolist()
    sim = to_numpy(similarity)
    dominant = _descending(usage)[:num_groups]
    expert_map = np.zeros(len(usage), np.int32)
    for e in range(len(usage)):
        if e in dominant:
            expert_map[e] = dominant.index(e)
        else:
            expert_map[e] = _descending([float(sim[e, d]) for d in dominant])[0]
    return expert_map, np.array(dominant, np.int32)


def reference_merge_experts(
    weights: dict[str, Any], expert_map: Any, frequencies: Any, num_groups: int
) -> dict[str, np.ndarray]:
    groups = to_numpy(expert_map).tolist()
    freq = to_numpy(frequencies).astype(np.float64).tolist()
    out = {}
    for name, value in weights.items():
        stacked = to_numpy(value).astype(np.float64)
        merged = np.zeros((num_groups, *stacked.shape[1:]))
        for g in range(num_groups):
            members = [e for e in range(len(groups)) if groups[e] == g]
            total = sum(freq[e] for e in members)
            for e in members:
                coefficient = freq[e] / total if total > 0 else 1.0 / len(members)
                merged[g] += coefficient * stacked[e]
        out[name] = merged
    return out


def reference_remap_expert_ids(expert_ids: Any, expert_map: Any) -> np.ndarray:
    groups = to_numpy(expert_map).tolist()
    return np.array([groups[e] if e >= 0 else -1 for e in to_numpy(expert_ids).tolist()], np.int32)
