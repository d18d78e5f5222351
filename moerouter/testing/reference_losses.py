"""Float64 loop references for the losses and statistics added beyond the Switch loss and z-loss.

Written from the docstrings of :mod:`moerouter.losses` and :mod:`moerouter.stats`, one token or
one expert at a time in plain Python and NumPy float64, sharing no code with them. The Switch
loss, the AdaMoE loss and the z-loss references stay in :mod:`moerouter.testing.reference`.
Masks may be (T,) or (G, S) bool arrays of any backend, or None (every token valid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference import (
    _balance,
    _counted_pairs,
    _flat_mask,
    _grouped_float32,
    _normalised_row,
    _routing,
    _row_is_finite,
)

__all__ = [
    "reference_co_occurrence",
    "reference_concatenated_load_balancing",
    "reference_entropy",
    "reference_importance_loss",
    "reference_load_loss",
    "reference_normal_cdf",
    "reference_processed_by_at_least",
    "reference_sequence_load_balancing",
]


def _cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return variance / (mean**2 + 1e-10)


def _valid(r: dict[str, Any], mask: Any) -> list[bool]:
    keep = _flat_mask(mask, r["num_tokens"])
    return [bool(r["finite_rows"][t]) and bool(keep[t]) for t in range(r["num_tokens"])]


def reference_normal_cdf(x: float) -> float:
    """The standard normal CDF in float64 from :func:`math.erfc`."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def reference_importance_loss(routing: Any, source: str = "weights", mask: Any = None) -> float:
    """:func:`moerouter.losses.importance_loss` in float64: CV² of the summed gate per expert.

    Parameters
    ----------
    routing : Routing or dict
    source : {"weights", "probs"}
        Combine weights per real expert, or router probabilities per column.
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    float
    """
    r = _routing(routing)
    valid = _valid(r, mask)
    if source == "probs":
        columns = r["probs"].shape[-1]
        importance = [
            sum(float(r["probs"][t, e]) for t in range(r["num_tokens"]) if valid[t])
            for e in range(columns)
        ]
    else:
        importance = [0.0] * r["num_experts"]
        assignments = zip(r["token_ids"], r["expert_ids"], r["weights"], strict=True)
        for token, expert, weight in assignments:
            if expert >= 0 and valid[token]:
                importance[expert] += float(weight)
    return _cv_squared(importance)


def reference_load_loss(
    logits: Any,
    noisy_logits: Any,
    noise_std: Any,
    k: int,
    threshold: str = "shazeer",
    mask: Any = None,
) -> float:
    """:func:`moerouter.losses.load_loss` in float64, token by token with :func:`math.erfc`.

    Parameters
    ----------
    logits, noisy_logits : array (T, E) or (G, S, E)
        Rounded to float32 first.
    noise_std : float or array (scalar or the logits' shape)
    k : int
    threshold : {"shazeer", "vmoe"}
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    float
    """
    clean = _grouped_float32(logits).astype(np.float64)
    num_experts = clean.shape[-1]
    clean = clean.reshape(-1, num_experts)
    noisy = _grouped_float32(noisy_logits).astype(np.float64).reshape(-1, num_experts)
    std = np.asarray(to_numpy(noise_std), np.float32).astype(np.float64)
    std = np.broadcast_to(std.reshape(-1, num_experts) if std.ndim else std, clean.shape)
    keep = _flat_mask(mask, clean.shape[0])
    load = [0.0] * num_experts
    for t in range(clean.shape[0]):
        if not (keep[t] and _row_is_finite(clean[t]) and _row_is_finite(noisy[t])):
            continue
        ranked = sorted(noisy[t].tolist(), reverse=True)
        for e in range(num_experts):
            theta = ranked[k - 1]
            if threshold == "shazeer" and noisy[t, e] > ranked[k]:
                theta = ranked[k]
            if clean[t, e] == -math.inf:
                continue  # never selected
            if theta == -math.inf:
                load[e] += 1.0  # every finite logit clears a -inf threshold
            elif std[t, e] > 0:
                load[e] += reference_normal_cdf((clean[t, e] - theta) / std[t, e])
            else:
                load[e] += float(clean[t, e] > theta)
    return _cv_squared(load)


def reference_sequence_load_balancing(
    routing: Any,
    alpha: float = 1.0,
    mask: Any = None,
    convention: str = "deepseek",
    count: str = "top_k",
) -> float:
    """:func:`moerouter.losses.sequence_load_balancing` in float64, sequence by sequence.

    ``"deepseek"``: ``f_i = E' / (k T_g) * count_i``, ``P_i = mean_t p̂_{t,i}`` per sequence
    (group) ``g``, ``alpha * mean_g sum_i f_i P_i`` over sequences holding a valid token.
    ``"megatron"``: ``T_g`` replaced by the mean valid length over all ``G`` sequences and the
    mean taken over all of them (Megatron-Core ``_apply_seq_aux_loss``).

    Parameters
    ----------
    routing : Routing or dict
    alpha : float
    mask : array (T,) or (G, S) bool, optional
    convention : {"deepseek", "megatron"}
    count : {"top_k", "choices"}

    Returns
    -------
    float
    """
    r = _routing(routing)
    valid = _valid(r, mask)
    pairs = _counted_pairs(r, count)
    columns = r["probs"].shape[-1]
    k = r["slots"]
    group_size = r["num_tokens"] // r["num_groups"]
    mean_length = sum(valid) / r["num_groups"]
    losses = []
    for g in range(r["num_groups"]):
        tokens = [t for t in range(g * group_size, (g + 1) * group_size) if valid[t]]
        if not tokens:
            if convention == "megatron":
                losses.append(0.0)  # an all-padding sequence still counts in the mean
            continue
        length = mean_length if convention == "megatron" else len(tokens)
        counts = [0] * columns
        for token, column in pairs:
            if token in tokens:
                counts[column] += 1
        f = [columns * c / (k * length) for c in counts]
        p = np.zeros(columns)
        for t in tokens:
            p += _normalised_row(r["probs"][t]) / length
        losses.append(sum(f[i] * float(p[i]) for i in range(columns)))
    return alpha * (sum(losses) / len(losses)) if losses else 0.0


def reference_concatenated_load_balancing(
    routings: Sequence[Any],
    convention: str = "megatron",
    masks: Sequence[Any] | None = None,
    count: str = "top_k",
) -> float:
    """:func:`reference_load_balancing` of several routings concatenated along tokens.

    The concatenation is built as a dict (token ids shifted, groups merged into one), so the
    global-batch state functions can be checked without routing the concatenated logits.
    """
    parts = [_routing(r) for r in routings]
    masks = list(masks) if masks is not None else [None] * len(parts)
    offset = 0
    merged: dict[str, list[Any]] = {name: [] for name in ("token_ids", "choice_ids")}
    probs, finite = [], []
    for part, mask in zip(parts, masks, strict=True):
        merged["token_ids"].append(part["token_ids"] + offset)
        merged["choice_ids"].append(part["choice_ids"])
        probs.append(part["probs"])
        finite.append(part["finite_rows"] & _flat_mask(mask, part["num_tokens"]))
        offset += part["num_tokens"]
    concatenated = {
        "token_ids": np.concatenate(merged["token_ids"]),
        "choice_ids": np.concatenate(merged["choice_ids"]),
        "expert_ids": np.concatenate(merged["choice_ids"]),
        "weights": np.zeros(sum(len(c) for c in merged["choice_ids"])),
        "probs": np.concatenate(probs),
        "finite_rows": np.concatenate(finite),
        "num_tokens": offset,
        "num_experts": parts[0]["num_experts"],
        "layout": parts[0]["layout"],
        "slots": parts[0]["slots"],
        "num_groups": 1,
    }
    return _balance(concatenated, convention, pool_null=False, count=count)


def reference_entropy(routing: Any, mask: Any = None) -> float:
    """:func:`moerouter.losses.entropy` in float64: mean over valid tokens of ``-sum p̂ log p̂``.

    Parameters
    ----------
    routing : Routing or dict
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    float
    """
    r = _routing(routing)
    valid = _valid(r, mask)
    entropies: list[float] = []
    for t in range(r["num_tokens"]):
        if valid[t]:
            p: list[float] = _normalised_row(r["probs"][t]).tolist()
            entropies.append(-sum(v * math.log(v) for v in p if v > 0))
    return sum(entropies) / max(len(entropies), 1)


def _experts_of_tokens(r: dict[str, Any], valid: list[bool]) -> list[set[int]]:
    reached: list[set[int]] = [set() for _ in range(r["num_tokens"])]
    for token, expert in zip(r["token_ids"], r["expert_ids"], strict=True):
        if expert >= 0 and valid[token]:
            reached[token].add(int(expert))
    return reached


def reference_co_occurrence(routing: Any, mask: Any = None) -> np.ndarray:
    """:func:`moerouter.stats.co_occurrence` with loops: tokens reaching both experts.

    Parameters
    ----------
    routing : Routing or dict
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    numpy.ndarray (E, E) int64
    """
    r = _routing(routing)
    counts = np.zeros((r["num_experts"], r["num_experts"]), np.int64)
    for experts in _experts_of_tokens(r, _valid(r, mask)):
        for i in experts:
            for j in experts:
                counts[i, j] += 1
    return counts


def reference_processed_by_at_least(
    routing: Any, thresholds: Sequence[int] | None = None, mask: Any = None
) -> np.ndarray:
    """:func:`moerouter.stats.processed_by_at_least` with loops.

    Parameters
    ----------
    routing : Routing or dict
    thresholds : sequence of int, optional
        Default ``0 .. fan_in``.
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    numpy.ndarray float64
    """
    r = _routing(routing)
    fan_in = r["slots"] if r["layout"] == "token" else r["num_experts"]
    valid = _valid(r, mask)
    reached = _experts_of_tokens(r, valid)
    sizes = [len(reached[t]) for t in range(r["num_tokens"]) if valid[t]]
    chosen = list(range(fan_in + 1)) if thresholds is None else list(thresholds)
    return np.array([sum(n >= t for n in sizes) / max(len(sizes), 1) for t in chosen])
