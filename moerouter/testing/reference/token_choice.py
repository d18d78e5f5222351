"""Float64 loop references for the token-choice policies: top-k, null experts, DeepSeek,
GShard top-2 and hash routing.

Written from the docstrings of :class:`moerouter.TopK`, :class:`moerouter.NullExperts`,
:class:`moerouter.DeepSeekTopK`, :class:`moerouter.GShardTop2` and :class:`moerouter.HashRouter`,
one token at a time, sharing no code with :mod:`moerouter._agnostic`. Values compared *across*
columns whose float32 rounding a backend computes itself (DeepSeek's scores plus bias, GShard's
gate against a uniform draw) are compared as float32 roundings of the float64 values, so
backends agree with these references on inputs without float32 near-ties.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import (
    _descending,
    _grouped_float32,
    _ranked_columns,
    _row_is_finite,
    _sigmoid,
    _softmax,
    place_choices,
    token_arrays,
)
from moerouter.testing.reference.capacity import Capacity

__all__ = [
    "reference_deepseek",
    "reference_gshard_top2",
    "reference_hash",
    "reference_null_experts",
    "reference_topk",
    "reference_update_expert_bias",
]


def _token_choice(
    values: np.ndarray,
    num_experts: int,
    k: int,
    weight_rule: Any,
    score_rule: Any,
    *,
    capacity_factor: float | None,
    capacity_multiple_of: int,
    drop_policy: str,
    min_capacity: int = 0,
) -> dict[str, Any]:
    """Shared token-choice loop; ``values`` is float32 (G, S, E')."""
    num_groups, group_size, num_columns = values.shape
    choice, expert, weights, probs, finite = token_arrays(num_groups, group_size, k, num_columns)
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s]
            if not _row_is_finite(row):
                # The row routes nowhere; its raw choices are those of an all-zero row.
                choice[g, s] = np.arange(k)
                continue
            finite[g, s] = True
            probs[g, s] = score_rule(row)
            picked = _ranked_columns(row)[:k]
            choice[g, s] = picked
            routed = [j < num_experts and row[j] > -math.inf for j in picked]
            weights[g, s] = weight_rule(row, probs[g, s], picked, routed)
            for slot, column in enumerate(picked):
                if routed[slot]:
                    expert[g, s, slot] = column
                else:
                    weights[g, s, slot] = 0.0

    capacity = Capacity(capacity_factor, drop_policy, capacity_multiple_of, min_capacity)
    return capacity.routing(num_experts, choice, expert, weights, probs, finite)


def _softmax_of_routed(row: np.ndarray, picked: list[int], routed: list[bool]) -> list[float]:
    """Softmax of the routed selected logits (zero elsewhere, all zero if none is routed)."""
    chosen = [float(row[j]) for j, r in zip(picked, routed, strict=True) if r]
    if not chosen:
        return [0.0] * len(picked)
    top = max(chosen)
    total = sum(math.exp(v - top) for v in chosen)
    return [
        math.exp(float(row[j]) - top) / total if r else 0.0
        for j, r in zip(picked, routed, strict=True)
    ]


def reference_topk(
    logits: Any,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    softmax_after_topk: bool = False,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
    min_capacity: int = 0,
) -> dict[str, Any]:
    """What :class:`moerouter.TopK` must return, computed token by token in float64.

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Router logits of any backend and float dtype.
    k, score, normalize, softmax_after_topk, capacity_factor, capacity_multiple_of, drop_policy
    min_capacity
        As in :class:`moerouter.TopK`.

    Returns
    -------
    dict
        The :class:`moerouter.Routing` fields as NumPy arrays (float64 ``weights`` and ``probs``).
    """
    values = _grouped_float32(logits)

    def weight_rule(row, probs, picked, routed):  # type: ignore[no-untyped-def]
        if softmax_after_topk or (score == "softmax" and normalize):
            return _softmax_of_routed(row, picked, routed)
        chosen = [probs[j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
        total = sum(chosen)
        if normalize and total > 0:
            chosen = [w / total for w in chosen]
        return chosen

    return _token_choice(
        values,
        values.shape[-1],
        k,
        weight_rule,
        _softmax if score == "softmax" else _sigmoid,
        capacity_factor=capacity_factor,
        capacity_multiple_of=capacity_multiple_of,
        drop_policy=drop_policy,
        min_capacity=min_capacity,
    )


def reference_null_experts(
    logits: Any,
    num_experts: int,
    num_null: int,
    k: int,
    *,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
    min_capacity: int = 0,
) -> dict[str, Any]:
    """What :class:`moerouter.NullExperts` (AdaMoE) must return, token by token in float64.

    Softmax over all ``E + m`` columns, top-k over all of them, weights renormalised over the
    selected real experts only (all zero when a token picked only null experts). Capacity, if set,
    is ``ceil(cf * S * k / E)`` with ``E`` the real experts.

    Parameters
    ----------
    logits : array (T, E + m) or (G, S, E + m)
        Router logits, real expert columns first.
    num_experts, num_null, k, capacity_factor, capacity_multiple_of, drop_policy, min_capacity
        As in :class:`moerouter.NullExperts`.

    Returns
    -------
    dict
        The :class:`moerouter.Routing` fields as NumPy arrays.
    """
    values = _grouped_float32(logits)
    if values.shape[-1] != num_experts + num_null:
        raise ValueError("logits must have num_experts + num_null columns")

    def weight_rule(row, probs, picked, routed):  # type: ignore[no-untyped-def]
        real = [probs[j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
        total = sum(real)
        return [w / total for w in real] if total > 0 else real

    return _token_choice(
        values,
        num_experts,
        k,
        weight_rule,
        _softmax,
        capacity_factor=capacity_factor,
        capacity_multiple_of=capacity_multiple_of,
        drop_policy=drop_policy,
        min_capacity=min_capacity,
    )


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
    choice, expert, weights, probs, finite = token_arrays(num_g, group_size, k, num_experts)
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
            place_choices(
                expert,
                weights,
                (g, s),
                picked,
                routed,
                [weight * routed_scaling_factor for weight in chosen],
            )
    capacity = Capacity(capacity_factor, drop_policy, capacity_multiple_of, min_capacity)
    return capacity.routing(num_experts, choice, expert, weights, probs, finite)


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
    choice, expert, weights, probs, finite = token_arrays(num_g, group_size, 2, num_experts)
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
            place_choices(expert, weights, (g, s), picked, routed, gates)
    capacity = Capacity(capacity_factor, drop_policy, capacity_multiple_of, min_capacity)
    return capacity.routing(num_experts, choice, expert, weights, probs, finite)


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
