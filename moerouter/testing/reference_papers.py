"""Float64 loop references for the seed-paper modules: BTM, MC-SMoE, MEMoE, LocMoE.

Written from the docstrings of :mod:`moerouter.methods.ensemble`, :mod:`moerouter.methods.merging`,
:mod:`moerouter.policies.anchor` and :mod:`moerouter.policies.locality`, one token, expert or
position at a time in plain Python and NumPy float64; no code is shared with those modules.
Inputs may be arrays of any backend (copied to NumPy first). Logits are rounded to float32 first,
as the policies do, and selections rank those float32 values with ties to the lower index.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference import reference_capacity

__all__ = [
    "reference_affinity_routing",
    "reference_affinity_scores",
    "reference_anchor_mean_logits",
    "reference_average_parameters",
    "reference_domain_posterior",
    "reference_ensemble_log_likelihood",
    "reference_expert_similarity",
    "reference_group_experts",
    "reference_grouped_average_pooling",
    "reference_locality_loss",
    "reference_locality_topk",
    "reference_merge_experts",
    "reference_remap_expert_ids",
    "reference_routing_statistics",
    "reference_top_k_prior",
    "reference_update_prior",
]


def _descending(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def _softmax(row: list[float]) -> list[float]:
    finite = [v for v in row if v > -math.inf]
    top = max(finite)
    exps = [0.0 if v == -math.inf else math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


# --- Branch-Train-Merge ----------------------------------------------------------------------


def reference_domain_posterior(
    log_likelihoods: Any, prior: Any, *, window: int | None = 1, first_position: str = "uniform"
) -> np.ndarray:
    """Posterior over experts at each position of one sequence (T, J), or a batch (B, T, J)."""
    values = to_numpy(log_likelihoods).astype(np.float32).astype(np.float64)
    pi = to_numpy(prior).astype(np.float32).astype(np.float64)
    if values.ndim == 3:
        priors = pi if pi.ndim == 2 else np.broadcast_to(pi, (values.shape[0], pi.shape[-1]))
        return np.stack(
            [
                reference_domain_posterior(
                    values[b], priors[b], window=window, first_position=first_position
                )
                for b in range(values.shape[0])
            ]
        )
    num_positions, num_experts = values.shape
    out = np.zeros((num_positions, num_experts))
    for t in range(num_positions):
        if t == 0 and first_position == "uniform":
            allowed = [j for j in range(num_experts) if pi[j] > 0]
            for j in allowed:
                out[t, j] = 1.0 / len(allowed)
            continue
        start = 0 if window is None else max(0, t - window)
        scores = []
        for j in range(num_experts):
            if pi[j] <= 0:
                scores.append(-math.inf)
                continue
            scores.append(math.log(pi[j]) + sum(values[s, j] for s in range(start, t)))
        out[t] = _softmax(scores)
    return out


def reference_ensemble_log_likelihood(log_likelihoods: Any, weights: Any) -> np.ndarray:
    """``log sum_j w_j p_j`` per position."""
    values = to_numpy(log_likelihoods).astype(np.float32).astype(np.float64)
    mix = np.broadcast_to(to_numpy(weights).astype(np.float32).astype(np.float64), values.shape)
    out = np.zeros(values.shape[:-1])
    for index in np.ndindex(*values.shape[:-1]):
        out[index] = math.log(
            sum(mix[index][j] * math.exp(values[index][j]) for j in range(values.shape[-1]))
        )
    return out


def reference_update_prior(prior: Any, posteriors: Any, *, alpha: float = 0.3) -> np.ndarray:
    """pandas ``ewm(alpha, adjust=False)`` over the rows, continuing from ``prior``."""
    rows = np.atleast_2d(to_numpy(posteriors).astype(np.float64))
    state = None if prior is None else to_numpy(prior).astype(np.float64)
    for row in rows:
        state = row.copy() if state is None else (1 - alpha) * state + alpha * row
    assert state is not None
    return state


def reference_top_k_prior(prior: Any, k: int) -> np.ndarray:
    values = to_numpy(prior).astype(np.float32).astype(np.float64)
    out = np.zeros_like(values)
    for index in np.ndindex(*values.shape[:-1]):
        row = values[index]
        keep = _descending(row.tolist())[:k]
        total = sum(row[j] for j in keep)
        for j in keep:
            out[index][j] = row[j] / total if total > 0 else 0.0
    return out


def reference_average_parameters(parameters: list[Any], weights: list[float]) -> Any:
    """Weighted average (weights normalised) of nests of dicts, lists and tuples."""
    total = float(sum(weights))
    first = parameters[0]
    if isinstance(first, dict):
        return {
            key: reference_average_parameters([p[key] for p in parameters], weights)
            for key in first
        }
    if isinstance(first, list | tuple):
        return [
            reference_average_parameters([p[i] for p in parameters], weights)
            for i in range(len(first))
        ]
    leaves = [to_numpy(p).astype(np.float64) for p in parameters]
    return sum(w / total * leaf for w, leaf in zip(weights, leaves, strict=True))


# --- MC-SMoE ---------------------------------------------------------------------------------


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


# --- MEMoE -----------------------------------------------------------------------------------


def reference_anchor_mean_logits(logits: Any, anchor_ids: Any) -> np.ndarray:
    values = to_numpy(logits).astype(np.float32).astype(np.float64)
    shape = values.shape
    rows = values.reshape(-1, shape[-1])
    anchors = to_numpy(anchor_ids).tolist()
    out = rows.copy()
    for t, anchor in enumerate(anchors):
        if anchor < 0 or not np.all(np.isfinite(rows[t])):
            continue
        members = [s for s, a in enumerate(anchors) if a == anchor and np.all(np.isfinite(rows[s]))]
        out[t] = sum(rows[s] for s in members) / len(members)
    return out.reshape(shape)


# --- LocMoE / LocMoE+ ------------------------------------------------------------------------


def _row_is_finite(row: np.ndarray) -> bool:
    ok = all(math.isfinite(v) or v == -math.inf for v in row.tolist())
    return ok and any(v > -math.inf for v in row.tolist())


def _routing_dict(
    choice: np.ndarray,
    expert: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    finite: np.ndarray,
    num_experts: int,
) -> dict[str, Any]:
    num_groups, group_size, k = choice.shape
    num_tokens = num_groups * group_size
    return {
        "token_ids": np.repeat(np.arange(num_tokens, dtype=np.int32), k),
        "expert_ids": expert.reshape(-1),
        "weights": weights.reshape(-1),
        "choice_ids": choice.reshape(-1),
        "probs": probs.reshape(num_tokens, -1),
        "finite_rows": finite.reshape(-1),
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "layout": "token",
        "slots": k,
        "num_groups": num_groups,
    }


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
    choice = np.zeros((num_groups, group_size, k), np.int32)
    expert = np.full((num_groups, group_size, k), -1, np.int32)
    weights = np.zeros((num_groups, group_size, k))
    probs = np.zeros((num_groups, group_size, num_experts))
    finite = np.zeros((num_groups, group_size), bool)
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s]
            finite[g, s] = _row_is_finite(row)
            # A non-finite row routes nowhere; its raw choices are those of an all-zero row.
            row64 = [float(v) for v in row] if finite[g, s] else [0.0] * num_experts
            p = _softmax(row64)
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
            for slot, e in enumerate(picked):
                if routed[slot]:
                    expert[g, s, slot] = e
                    weights[g, s, slot] = w[slot]
    if capacity_factor is not None:
        per_expert = reference_capacity(
            capacity_factor, group_size, k, num_experts, capacity_multiple_of
        )
        for g in range(num_groups):
            used = [0] * num_experts
            for slot in range(k):
                order = list(range(group_size))
                if drop_policy == "probs":
                    order = _descending([probs[g, s, choice[g, s, slot]] for s in order])
                for s in order:
                    e = expert[g, s, slot]
                    if e < 0:
                        continue
                    if used[e] < per_expert:
                        used[e] += 1
                    else:
                        expert[g, s, slot] = -1
                        weights[g, s, slot] = 0.0
    return _routing_dict(choice, expert, weights, probs, finite, num_experts)


def reference_affinity_routing(
    logits: Any, affinity: Any | None, *, capacity_factor: float, capacity_multiple_of: int = 1
) -> dict[str, Any]:
    """What :class:`moerouter.policies.AffinityRouting` must return, token by token."""
    values = to_numpy(logits).astype(np.float32)
    if values.ndim == 2:
        values = values[None]
    num_groups, group_size, num_experts = values.shape
    choice = np.zeros((num_groups, group_size, 1), np.int32)
    expert = np.full((num_groups, group_size, 1), -1, np.int32)
    weights = np.zeros((num_groups, group_size, 1))
    probs = np.zeros((num_groups, group_size, num_experts))
    finite = np.zeros((num_groups, group_size), bool)
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
            probs[g, s] = _softmax([float(v) for v in row])
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
    return _routing_dict(choice, expert, weights, probs, finite, num_experts)


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
