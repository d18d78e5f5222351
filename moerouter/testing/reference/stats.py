"""Float64 loop references for :mod:`moerouter.stats`: the routing summary,
expert co-occurrence and the tokens processed by at least n experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moerouter.testing.reference._common import _routing
from moerouter.testing.reference.losses import _valid

__all__ = ["reference_co_occurrence", "reference_processed_by_at_least", "reference_summary"]


def reference_summary(routing: Any) -> dict[str, Any]:
    """:func:`moerouter.stats.summary` computed with loops in float64.

    Parameters
    ----------
    routing : Routing or dict

    Returns
    -------
    dict
        The same keys as :func:`moerouter.stats.summary`; counts as int, the rest as float.
    """
    r = _routing(routing)
    num_experts, num_tokens = r["num_experts"], r["num_tokens"]
    fan_in = r["slots"] if r["layout"] == "token" else num_experts
    finite = r["finite_rows"]
    num_finite = int(finite.sum())
    load = np.zeros(num_experts, np.int64)
    per_token = np.zeros(num_tokens, np.int64)
    choices = real_choices = dropped = null_choices = 0
    for token, expert, column in zip(r["token_ids"], r["expert_ids"], r["choice_ids"], strict=True):
        if expert >= 0:
            load[expert] += 1
            per_token[token] += 1
        if not finite[token]:
            continue
        choices += 1
        if column < num_experts:
            real_choices += 1
            dropped += expert < 0
        else:
            null_choices += 1
    mean_load = max(load.mean(), 1e-30)
    histogram = np.zeros(fan_in + 1, np.int64)
    entropies = []
    for t in range(num_tokens):
        if not finite[t]:
            continue
        histogram[per_token[t]] += 1
        row = r["probs"][t].astype(np.float64)
        p = row / row.sum() if row.sum() > 0 else row
        entropies.append(-sum(v * math.log(v) for v in p if v > 0))
    return {
        "tokens_per_expert": load,
        "load_cv": float(load.std() / mean_load),
        "load_max_over_mean": float(load.max() / mean_load),
        "dropped_fraction": dropped / max(real_choices, 1),
        "real_experts_per_token": per_token.sum() / max(num_finite, 1),
        "real_experts_histogram": histogram,
        "null_fraction": null_choices / max(choices, 1),
        "router_entropy": sum(entropies) / max(num_finite, 1),
        "nonfinite_rows": num_tokens - num_finite,
        "processed_by_at_least": np.cumsum(histogram[::-1])[::-1] / max(num_finite, 1),
    }


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
