"""Expert capacity and the over-capacity drop of the token-layout references.

``reference_capacity`` reads the capacity factor as the decimal it prints as; the drops take
slots k-major, tokens in order, by probability or by the first choice's probability (V-MoE's
batch-priority routing).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from moerouter.testing.reference._common import _descending, token_routing

__all__ = ["Capacity", "drop_over_capacity", "reference_capacity"]


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


@dataclass(frozen=True)
class Capacity:
    """A token-choice policy's capacity options; ``factor=None``: no capacity, nothing dropped."""

    factor: float | None
    drop_policy: str = "position"
    multiple_of: int = 1
    minimum: int = 0

    def drop(self, num_experts: int, *arrays: np.ndarray) -> int | None:
        """Drop past :func:`reference_capacity` of the group, in place; the capacity or None.

        ``arrays`` are ``expert, weights, probs, choice`` of :func:`drop_over_capacity`.
        """
        if self.factor is None:
            return None
        expert, weights, probs, choice = arrays
        _, group_size, k = expert.shape
        per_expert = reference_capacity(
            self.factor, group_size, k, num_experts, self.multiple_of, self.minimum
        )
        drop_over_capacity(expert, weights, probs, choice, per_expert, self.drop_policy)
        return per_expert

    def routing(self, num_experts: int, *arrays: np.ndarray) -> dict[str, Any]:
        """The routing dict of :func:`token_routing` after :meth:`drop`.

        ``arrays`` are ``choice, expert, weights, probs, finite`` of :func:`token_routing`;
        ``expert`` and ``weights`` are edited in place.
        """
        choice, expert, weights, probs, finite = arrays
        per_expert = self.drop(num_experts, expert, weights, probs, choice)
        return token_routing(choice, expert, weights, probs, finite, num_experts, per_expert)
