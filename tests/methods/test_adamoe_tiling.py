"""Real experts per token right after an AdaMoE conversion with tiled null rows (issue 23).

``to_adamoe`` starts null row ``j`` as a copy of real row ``j mod E``, so every null logit ties
with a real one and a token takes its best real experts each followed by its copies. The
documented count (docs/integrations/transformers.rst) is ``ceil(k / (1 + m / E))`` only when
``E`` divides ``m``; otherwise it ranges over ``[n_min, n_max]``. These tests check that
statement on every (E, m, k) of a sweep, with NullExperts on tiled logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import moerouter as mr


def documented_range(num_experts: int, num_null: int, k: int) -> tuple[int, int]:
    """``(n_min, n_max)`` exactly as the documentation states them."""
    q, r = divmod(num_null, num_experts)
    if k <= r * (q + 2):
        fewest = math.ceil(k / (q + 2))
    else:
        fewest = r + math.ceil((k - r * (q + 2)) / (q + 1))
    if k <= (num_experts - r) * (q + 1):
        most = math.ceil(k / (q + 1))
    else:
        most = (num_experts - r) + math.ceil((k - (num_experts - r) * (q + 1)) / (q + 2))
    return fewest, most


def real_experts_after_tiling(num_experts: int, num_null: int, k: int, tokens: int = 3000):
    real = np.random.default_rng(num_experts * 1000 + num_null * 10 + k).standard_normal(
        (tokens, num_experts)
    )
    tiled = np.concatenate([real, real[:, np.arange(num_null) % num_experts]], axis=1)
    routing = mr.NullExperts(num_experts, num_null, k)(tiled.astype(np.float32))
    return (routing.expert_ids.reshape(tokens, k) >= 0).sum(axis=1)


CASES = [
    (num_experts, num_null, k)
    for num_experts in (3, 4, 8)
    for num_null in range(0, 2 * num_experts + 2)
    for k in range(1, num_experts + num_null + 1)
]


@pytest.mark.parametrize("num_experts", [3, 4, 8])
def test_real_experts_per_token_cover_the_documented_range(num_experts):
    for e, m, k in (case for case in CASES if case[0] == num_experts):
        counts = real_experts_after_tiling(e, m, k)
        fewest, most = documented_range(e, m, k)
        assert (counts.min(), counts.max()) == (fewest, most), (e, m, k)
        if m % e == 0:  # the single value the formula gives when E divides m
            assert fewest == most == math.ceil(k / (1 + m / e)), (e, m, k)


def test_the_issue_example_is_a_range():
    # E = 8, m = 4, k = 7: 4 to 6 real experts; ceil(k / (1 + m / E)) = 5 would be wrong.
    assert documented_range(8, 4, 7) == (4, 6)
    counts = real_experts_after_tiling(8, 4, 7)
    assert set(counts.tolist()) == {4, 5, 6}
    assert math.ceil(7 / (1 + 4 / 8)) == 5
