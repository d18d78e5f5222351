"""Float64 loop references for the routing family beyond top-k: DeepSeek, GShard, noise,
padded plans, hash routing and cosine logits.

Written from the docstrings of :class:`moerouter.DeepSeekTopK`, :class:`moerouter.GShardTop2`,
:mod:`moerouter.gates.noise` and :func:`moerouter.make_plan` (``pad_to_capacity=True``), one
token at a time, sharing no code with :mod:`moerouter._agnostic`. The conventions of
:mod:`moerouter.testing.reference` hold: logits are rounded to float32 first; values compared
*across* columns whose float32 rounding a backend computes itself (DeepSeek's scores plus bias,
GShard's gate against a uniform draw) are compared as float32 roundings of the float64 values,
so backends agree with these references on inputs without float32 near-ties.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference import (
    _descending,
    _grouped_float32,
    _row_is_finite,
    _sigmoid,
    _softmax,
    reference_capacity,
    reference_make_plan,
)

__all__ = [
    "reference_cosine_router_logits",
    "reference_deepseek",
    "reference_gshard_top2",
    "reference_hash",
    "reference_multiplicative_jitter",
    "reference_noisy_top_k_std",
    "reference_padded_plan",
    "reference_update_expert_bias",
    "reference_vmoe_logit_noise",
]


def _apply_capacity(
    expert: np.ndarray,
    weights: np.ndarray,
    priority_probs: np.ndarray,
    *,
    num_experts: int,
    capacity_factor: float | None,
    capacity_multiple_of: int,
    min_capacity: int,
    drop_policy: str,
) -> int | None:
    """Drop over-capacity choices in place (k-major); returns the capacity. Arrays (G, S, k)."""
    if capacity_factor is None:
        return None
    num_groups, group_size, k = expert.shape
    per_expert = reference_capacity(
        capacity_factor, group_size, k, num_experts, capacity_multiple_of, min_capacity
    )
    for g in range(num_groups):
        used = [0] * num_experts
        for slot in range(k):
            tokens = list(range(group_size))
            if drop_policy == "probs":
                tokens = _descending([priority_probs[g, s, slot] for s in tokens])
            elif drop_policy == "batch_priority":
                tokens = _descending([priority_probs[g, s, 0] for s in tokens])
            for s in tokens:
                e = expert[g, s, slot]
                if e < 0:
                    continue
                if used[e] < per_expert:
                    used[e] += 1
                else:
                    expert[g, s, slot] = -1
                    weights[g, s, slot] = 0.0
    return per_expert


def _token_routing(
    choice: np.ndarray,
    expert: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    finite: np.ndarray,
    *,
    num_experts: int,
    capacity: int | None,
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
        "capacity": capacity,
    }


def reference_deepseek(
    logits: Any,
    k: int,
    bias: Any = None,
    *,
    num_groups: int = 1,
    topk_groups: int | None = None,
    score: str = "sigmoid",
    normalize: bool = True,
    routed_scaling_factor: float = 1.0,
    group_score: str = "top2_sum",
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    min_capacity: int = 0,
    drop_policy: str = "position",
) -> dict[str, Any]:
    """What :class:`moerouter.DeepSeekTopK` must return, token by token.

    Selection ranks ``float32(float32(score) + float32(bias))`` (groups by the float32 sum of
    their two best, their best, or their ``k // topk_groups`` best); weights are the float64
    unbiased scores.
    """
    values = _grouped_float32(logits)
    num_g, group_size, num_experts = values.shape
    bias32 = (
        np.zeros(num_experts, np.float32) if bias is None else to_numpy(bias).astype(np.float32)
    )
    per_group = num_experts // num_groups
    keep_groups = num_groups if topk_groups is None else topk_groups
    choice = np.zeros((num_g, group_size, k), np.int32)
    expert = np.full((num_g, group_size, k), -1, np.int32)
    weights = np.zeros((num_g, group_size, k))
    probs = np.zeros((num_g, group_size, num_experts))
    finite = np.zeros((num_g, group_size), bool)
    for g in range(num_g):
        for s in range(group_size):
            row = values[g, s]
            if not _row_is_finite(row):
                # The row routes nowhere; its raw choices are those of an all-zero row.
                zero_row = np.zeros(num_experts, np.float32)
                selection = _selection(zero_row, bias32, score)
                choice[g, s] = _pick(selection, k, num_groups, per_group, keep_groups, group_score)
                continue
            finite[g, s] = True
            scores = _sigmoid(row) if score == "sigmoid" else _softmax(row)
            probs[g, s] = scores
            selection = _selection(row, bias32, score)
            picked = _pick(selection, k, num_groups, per_group, keep_groups, group_score)
            eligible = _eligible_columns(
                selection, num_groups, per_group, keep_groups, group_score, k
            )
            routed = [selection[j] > -math.inf and j in eligible for j in picked]
            chosen = [scores[j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
            total = sum(chosen)
            if normalize and total > 0:
                chosen = [w / total for w in chosen]
            choice[g, s] = picked
            for slot, column in enumerate(picked):
                if routed[slot]:
                    expert[g, s, slot] = column
                    weights[g, s, slot] = chosen[slot] * routed_scaling_factor
    chosen_probs = np.take_along_axis(probs, choice, axis=-1)
    per_expert = _apply_capacity(
        expert,
        weights,
        chosen_probs,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        capacity_multiple_of=capacity_multiple_of,
        min_capacity=min_capacity,
        drop_policy=drop_policy,
    )
    return _token_routing(
        choice, expert, weights, probs, finite, num_experts=num_experts, capacity=per_expert
    )


def _selection(row: np.ndarray, bias32: np.ndarray, score: str) -> list[float]:
    scores = _sigmoid(row) if score == "sigmoid" else _softmax(row)
    out = []
    for j, v in enumerate(row.tolist()):
        if v == -math.inf:
            out.append(-math.inf)
        else:
            out.append(float(np.float32(np.float32(scores[j]) + bias32[j])))
    return out


def _group_scores(
    selection: list[float], num_groups: int, per_group: int, group_score: str, top: int
) -> list[float]:
    out = []
    for group in range(num_groups):
        members = sorted(selection[group * per_group : (group + 1) * per_group], reverse=True)
        if group_score == "topk_sum":  # Megatron-Core: the top k // topk_groups, in float32
            out.append(float(np.sum(np.asarray(members[:top], np.float32), dtype=np.float32)))
        elif group_score == "max" or per_group == 1:
            out.append(members[0])
        else:
            out.append(float(np.float32(members[0]) + np.float32(members[1])))
    return out


def _eligible_columns(
    selection: list[float],
    num_groups: int,
    per_group: int,
    keep_groups: int,
    group_score: str,
    k: int,
) -> set[int]:
    scores = _group_scores(selection, num_groups, per_group, group_score, k // keep_groups)
    ranked = _descending(scores)
    kept = ranked[:keep_groups]
    return {group * per_group + i for group in kept for i in range(per_group)}


def _pick(
    selection: list[float],
    k: int,
    num_groups: int,
    per_group: int,
    keep_groups: int,
    group_score: str,
) -> list[int]:
    eligible = _eligible_columns(selection, num_groups, per_group, keep_groups, group_score, k)
    masked = [v if j in eligible else -math.inf for j, v in enumerate(selection)]
    return _descending(masked)[:k]


def reference_update_expert_bias(bias: Any, tokens_per_expert: Any, rate: float) -> np.ndarray:
    """``bias + rate * sign(mean(counts) - counts)`` per row, in float64."""
    b = to_numpy(bias).astype(np.float64)
    counts = np.broadcast_to(to_numpy(tokens_per_expert).astype(np.float64), b.shape)
    out = b.copy()
    for index in np.ndindex(b.shape[:-1]):
        row = counts[index]
        mean = sum(row.tolist()) / len(row)
        for e, c in enumerate(row.tolist()):
            out[(*index, e)] += rate * (1.0 if mean > c else -1.0 if mean < c else 0.0)
    return out


def reference_gshard_top2(
    logits: Any,
    uniform: Any = None,
    *,
    second_expert_policy: str = "random",
    second_expert_threshold: float = 0.5,
    normalize: bool = True,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    min_capacity: int = 0,
    drop_policy: str = "position",
) -> dict[str, Any]:
    """What :class:`moerouter.GShardTop2` must return, token by token.

    The second expert is kept iff ``u < float32(g2_hat) / tau`` (compared in float32, as the
    policy does).
    """
    values = _grouped_float32(logits)
    num_g, group_size, num_experts = values.shape
    draws = None if uniform is None else to_numpy(uniform).astype(np.float32)
    if draws is not None:
        draws = draws.reshape(num_g, group_size)
    choice = np.zeros((num_g, group_size, 2), np.int32)
    expert = np.full((num_g, group_size, 2), -1, np.int32)
    weights = np.zeros((num_g, group_size, 2))
    probs = np.zeros((num_g, group_size, num_experts))
    finite = np.zeros((num_g, group_size), bool)
    for g in range(num_g):
        for s in range(group_size):
            row = values[g, s]
            if not _row_is_finite(row):
                choice[g, s] = [0, 1]
                continue
            finite[g, s] = True
            probs[g, s] = _softmax(row)
            picked = _descending(row.tolist())[:2]
            routed = [row[j] > -math.inf for j in picked]
            gates = [probs[g, s, j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
            if normalize and sum(gates) > 0:
                total = sum(gates)
                gates = [v / total for v in gates]
            if second_expert_policy == "random" and draws is not None:
                ratio = np.float32(np.float32(gates[1]) / np.float32(second_expert_threshold))
                if not draws[g, s] < ratio:
                    routed[1] = False
            choice[g, s] = picked
            for slot, column in enumerate(picked):
                if routed[slot]:
                    expert[g, s, slot] = column
                    weights[g, s, slot] = gates[slot]
    chosen_probs = np.take_along_axis(probs, choice, axis=-1)
    per_expert = _apply_capacity(
        expert,
        weights,
        chosen_probs,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        capacity_multiple_of=capacity_multiple_of,
        min_capacity=min_capacity,
        drop_policy=drop_policy,
    )
    return _token_routing(
        choice, expert, weights, probs, finite, num_experts=num_experts, capacity=per_expert
    )


def reference_vmoe_logit_noise(logits: Any, normal: Any, noise_std: float = 1.0) -> np.ndarray:
    """``logits + normal * noise_std / E'`` in float64."""
    values = to_numpy(logits).astype(np.float64)
    result: np.ndarray = values + to_numpy(normal).astype(np.float64) * (
        noise_std / values.shape[-1]
    )
    return result


def reference_noisy_top_k_std(noise_logits: Any, noise_epsilon: float = 1e-2) -> np.ndarray:
    """``softplus(noise_logits) + noise_epsilon`` in float64, entry by entry."""
    flat = to_numpy(noise_logits).astype(np.float64)
    out = np.array(
        [max(v, 0.0) + math.log1p(math.exp(-abs(v))) + noise_epsilon for v in flat.ravel()]
    )
    return out.reshape(flat.shape)


def reference_multiplicative_jitter(values: Any, uniform: Any, epsilon: float = 1e-2) -> np.ndarray:
    """``values * (1 - epsilon + 2 epsilon u)`` in float64."""
    v = to_numpy(values).astype(np.float64)
    u = to_numpy(uniform).astype(np.float64)
    result: np.ndarray = v * (1.0 - epsilon + 2.0 * epsilon * u)
    return result


def reference_padded_plan(routing: Any) -> dict[str, Any]:
    """What ``make_plan(routing, pad_to_capacity=True)`` must return, from the packed reference.

    Expert ``e``'s ``j``-th packed row moves to row ``e * C + j`` with ``C = G * capacity``
    (``capacity`` from the routing, or ``slots`` for the expert layout).
    """
    get = routing.get if isinstance(routing, dict) else lambda name: getattr(routing, name)
    per_group = get("capacity")
    if per_group is None:
        per_group = get("slots")
    capacity = get("num_groups") * per_group
    num_experts = get("num_experts")
    packed = reference_make_plan(routing)
    sizes = packed["group_sizes"].tolist()
    starts = [sum(sizes[:e]) for e in range(num_experts)]
    padded_row = {}  # packed row -> padded row
    order = np.full(num_experts * capacity, -1, np.int32)
    source = np.full(num_experts * capacity, -1, np.int32)
    for e in range(num_experts):
        for j in range(min(sizes[e], capacity)):
            packed_row = starts[e] + j
            padded_row[packed_row] = e * capacity + j
            order[e * capacity + j] = packed["order"][packed_row]
            source[e * capacity + j] = packed["source_tokens"][packed_row]
    expert_ids = to_numpy(get("expert_ids"))
    inverse = np.array(
        [
            padded_row.get(int(packed["inverse"][r]), -1) if expert_ids[r] >= 0 else -1
            for r in range(expert_ids.shape[0])
        ],
        np.int32,
    )
    rows = packed["combine_rows"].copy()
    weights = packed["combine_weights"].copy()
    for index in np.ndindex(rows.shape):
        if rows[index] >= 0:
            rows[index] = padded_row.get(int(rows[index]), -1)
            if rows[index] < 0:
                weights[index] = 0.0
    return {
        "group_sizes": np.minimum(packed["group_sizes"], capacity).astype(np.int32),
        "order": order,
        "inverse": inverse,
        "source_tokens": source,
        "num_valid": np.int32(len(padded_row)),
        "combine_rows": rows,
        "combine_weights": weights,
        "num_tokens": get("num_tokens"),
        "num_experts": num_experts,
        "capacity": capacity,
    }


def reference_hash(token_ids: Any, num_experts: int, table: Any = None) -> dict[str, Any]:
    """What :class:`moerouter.HashRouter` must return, token by token."""
    ids = to_numpy(token_ids)
    num_groups = 1 if ids.ndim == 1 else ids.shape[0]
    ids = ids.reshape(-1).tolist()
    rows = None if table is None else np.asarray(table).reshape(len(table), -1).tolist()
    k = 1 if rows is None else len(rows[0])
    token_out, expert_out, weight_out, choice_out = [], [], [], []
    probs = np.zeros((len(ids), num_experts))
    finite = np.zeros(len(ids), bool)
    for t, v in enumerate(ids):
        if rows is None:
            valid = v >= 0
            experts = [v % num_experts if valid else 0]
        else:
            valid = 0 <= v < len(rows)
            experts = rows[v] if valid else rows[0]
        finite[t] = valid
        for e in experts:
            token_out.append(t)
            choice_out.append(e)
            expert_out.append(e if valid else -1)
            weight_out.append(1.0 / k if valid else 0.0)
            if valid:
                probs[t, e] = 1.0 / k
    return {
        "token_ids": np.array(token_out, np.int32),
        "expert_ids": np.array(expert_out, np.int32),
        "weights": np.array(weight_out),
        "choice_ids": np.array(choice_out, np.int32),
        "probs": probs,
        "finite_rows": finite,
        "num_tokens": len(ids),
        "num_experts": num_experts,
        "layout": "token",
        "slots": k,
        "num_groups": num_groups,
    }


def reference_cosine_router_logits(
    tokens: Any,
    expert_embeddings: Any,
    log_scale: Any,
    max_log_scale: float = math.log(100.0),
    eps: float = 1e-12,
) -> np.ndarray:
    """Cosine logits in float64, one (token, expert) pair at a time."""
    h = to_numpy(tokens).astype(np.float64)
    w = to_numpy(expert_embeddings).astype(np.float64)
    tau = float(np.asarray(to_numpy(log_scale) if not isinstance(log_scale, float) else log_scale))
    scale = math.exp(min(tau, max_log_scale))
    flat = h.reshape(-1, h.shape[-1])
    out = np.zeros((flat.shape[0], w.shape[1]))
    for t in range(flat.shape[0]):
        token_norm = max(math.sqrt(sum(v * v for v in flat[t])), eps)
        for e in range(w.shape[1]):
            column = w[:, e]
            expert_norm = max(math.sqrt(sum(v * v for v in column)), eps)
            dot = sum(a * b for a, b in zip(flat[t], column, strict=True))
            out[t, e] = scale * dot / (token_norm * expert_norm)
    return out.reshape(*h.shape[:-1], w.shape[1])
