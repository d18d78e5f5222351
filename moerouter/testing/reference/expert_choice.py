"""Float64 loop reference for :class:`moerouter.ExpertChoice`: each expert takes its
``capacity`` highest-probability tokens, never a token whose logit is ``-inf``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.reference._common import _grouped_float32, _row_is_finite, _softmax
from moerouter.testing.reference.capacity import reference_capacity

__all__ = ["reference_expert_choice"]


def _expert_layout(
    ranking: np.ndarray,
    probs: np.ndarray,
    routable: np.ndarray,
    finite: np.ndarray,
    per_expert: int,
) -> dict[str, Any]:
    """The "expert" layout routing of every expert-choice policy, expert by expert.

    For every group and expert ``e``: the candidates are the tokens ``s`` with ``routable[g, s,
    e]`` (a finite row and a logit above -inf), best ``ranking`` first, ties to the lower token;
    the expert takes the first ``C = per_expert``, each weighing ``probs[g, s, e]``. A -inf logit
    is never routed to: if fewer than ``C`` tokens are candidates, the remaining slots hold the
    expert's other tokens in token order, as expert -1 with weight 0.
    """
    num_groups, group_size, num_experts = ranking.shape
    token_ids, expert_ids, weights, choice_ids = [], [], [], []
    for g in range(num_groups):
        for e in range(num_experts):
            candidates = [s for s in range(group_size) if routable[g, s, e]]
            candidates.sort(key=lambda s: (-float(ranking[g, s, e]), s))
            taken = candidates[:per_expert]
            others = [s for s in range(group_size) if not routable[g, s, e]]
            padding = others[: per_expert - len(taken)]
            for s in taken:
                token_ids.append(g * group_size + s)
                expert_ids.append(e)
                weights.append(float(probs[g, s, e]))
                choice_ids.append(e)
            for s in padding:
                token_ids.append(g * group_size + s)
                expert_ids.append(-1)
                weights.append(0.0)
                choice_ids.append(e)
    num_tokens = num_groups * group_size
    return {
        "token_ids": np.array(token_ids, np.int32),
        "expert_ids": np.array(expert_ids, np.int32),
        "weights": np.array(weights, np.float64),
        "choice_ids": np.array(choice_ids, np.int32),
        "probs": probs.reshape(num_tokens, num_experts),
        "finite_rows": finite.reshape(-1),
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "layout": "expert",
        "slots": per_expert,
        "num_groups": num_groups,
    }


def reference_expert_choice(
    logits: Any, capacity_factor: float, *, capacity_multiple_of: int = 1
) -> dict[str, Any]:
    """What :class:`moerouter.ExpertChoice` must return, expert by expert in float64.

    Per group of ``S`` tokens, every expert takes the ``C = min(ceil(cf * S / E), S)`` tokens
    (rounded up to ``capacity_multiple_of`` before the cap) with the largest softmax probability,
    best first, ties to the lower token index. A token whose logit for the expert is -inf, or whose
    row is non-finite, is never taken: it only fills slots left over, as expert -1 with weight 0.
    Layout "expert": ``R = G * E * C``.

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Router logits.
    capacity_factor, capacity_multiple_of
        As in :class:`moerouter.ExpertChoice`.

    Returns
    -------
    dict
        The :class:`moerouter.Routing` fields as NumPy arrays.
    """
    values = _grouped_float32(logits)
    num_groups, group_size, num_experts = values.shape
    per_expert = min(
        reference_capacity(capacity_factor, group_size, 1, num_experts, capacity_multiple_of),
        group_size,
    )
    probs = np.zeros((num_groups, group_size, num_experts))
    finite = np.zeros((num_groups, group_size), bool)
    routable = np.zeros((num_groups, group_size, num_experts), bool)
    for g in range(num_groups):
        for s in range(group_size):
            if _row_is_finite(values[g, s]):
                finite[g, s] = True
                probs[g, s] = _softmax(values[g, s])
                routable[g, s] = values[g, s] > -math.inf
    return _expert_layout(probs, probs, routable, finite, per_expert)
