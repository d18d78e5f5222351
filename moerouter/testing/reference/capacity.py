"""Expert capacity and the over-capacity drop of the token-layout references.

``reference_capacity`` reads the capacity factor as the decimal it prints as; the drops take
slots k-major, tokens in order, by probability or by the first choice's probability (V-MoE's
batch-priority routing).
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np

from moerouter.testing.reference._common import _descending

__all__ = ["drop_over_capacity", "reference_capacity"]


def reference_capacity(
    capacity_factor: float,
    tokens: int,
    per_token: int,
    experts: int,
    multiple_of: int = 1,
    minimum: int = 0,
) -> int:
    """``max(ceil(capacity_factor * tokens * per_token / experts), minimum)``, rounded up to
    ``multiple_of``.

    The factor is read as the decimal it prints as (``1.1`` means eleven tenths), with exact
    rational arithmetic, so float noise such as ``1.1 * 50 = 55.000000000000007`` never adds a row.
    """
    exact = Fraction(repr(float(capacity_factor))) * tokens * per_token / experts
    raw = max(math.ceil(exact), minimum)
    return max(multiple_of, math.ceil(Fraction(raw, multiple_of)) * multiple_of)


def drop_over_capacity(
    expert: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    choice: np.ndarray,
    per_expert: int,
    drop_policy: str,
) -> None:
    """Drop, in place, the assignments past ``per_expert`` per expert of each group.

    ``expert``, ``weights`` and ``choice`` are (G, S, k) and ``probs`` (G, S, E'). Slots are taken
    k-major (every first choice before any second choice), tokens in order ("position"), by
    descending probability of the slot's choice ("probs") or of the first choice
    ("batch_priority", V-MoE's BPR); a dropped assignment becomes expert -1, weight 0.
    """
    num_groups, group_size, k = expert.shape
    for g in range(num_groups):
        used: Counter[int] = Counter()  # assignments each expert has taken so far
        for slot in range(k):  # k-major: every first choice before any second choice
            tokens = list(range(group_size))
            if drop_policy == "probs":
                tokens = _descending([probs[g, s, choice[g, s, slot]] for s in tokens])
            elif drop_policy == "batch_priority":  # V-MoE BPR: the first choice ranks all
                tokens = _descending([probs[g, s, choice[g, s, 0]] for s in tokens])
            for s in tokens:
                e = expert[g, s, slot]
                if e < 0:
                    continue
                if used[e] < per_expert:
                    used[e] += 1
                else:
                    expert[g, s, slot] = -1
                    weights[g, s, slot] = 0.0


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
