"""SMoE-Dropout's helpers: the k schedules (against the official code) and evaluate_at_k."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moerouter as mr

SCHEDULE_POINTS = [
    # The released Transformer-XL schedule: 8 -> 16 linearly over 400k steps.
    pytest.param("linear_increase", 8, 16, [(0, 8), (200_000, 12), (400_000, 16), (10**6, 16)]),
    pytest.param("linear_decrease", 8, 16, [(0, 16), (200_000, 12), (400_000, 8)]),
    # Cosine: fast change early (increase) or late (decrease).
    pytest.param("cosine_increase", 1, 16, [(0, 1), (400_000, 16)]),
    pytest.param("cosine_decrease", 1, 16, [(0, 16), (400_000, 1)]),
    # 0.99 ** (t // (T // 300)): from k_min towards k_max, still 0.99**300 = 5% short at T.
    pytest.param("exp_increase", 2, 16, [(0, 2), (400_000, 15), (2_000_000, 16)]),
    pytest.param("exp_decrease", 2, 16, [(0, 16), (400_000, 3), (2_000_000, 2)]),
    # The official milestones 1, 2, 4, 8, 16, one fifth of training each.
    pytest.param("multi_step_increase", 1, 16, [(0, 1), (80_000, 2), (399_999, 16), (400_000, 16)]),
    pytest.param("multi_step_decrease", 1, 16, [(0, 16), (160_000, 4), (400_000, 1)]),
]


@pytest.mark.parametrize(("mode", "k_min", "k_max", "points"), SCHEDULE_POINTS)
def test_k_schedule_points(mode, k_min, k_max, points):
    for step, k in points:
        assert mr.k_schedule(step, mode=mode, k_min=k_min, k_max=k_max, total_steps=400_000) == k


def official_calculate_gate_number(step, mode, total, k_min, k_max):
    """A transcription of the official new_utils.py::calculate_gate_number (two exp modes)."""
    if mode == "linear_increase":
        k = round((k_max - k_min) * step / total) + k_min
    elif mode == "linear_decrease":
        k = round((k_min - k_max) * step / total) + k_max
    elif mode == "cosine_decrease":
        k = round((k_max - k_min) * np.cos(np.pi * step / (2 * total))) + k_min
    elif mode == "cosine_increase":
        k = round((k_min - k_max) * np.cos(np.pi * step / (2 * total))) + k_max
    else:
        k = round((k_min - k_max) * 0.99 ** (step // (total // 300))) + k_max
    return int(np.clip(k, k_min, k_max))


@settings(max_examples=60, deadline=None, database=None)
@given(
    mode=st.sampled_from(
        ["linear_increase", "linear_decrease", "cosine_increase", "cosine_decrease", "exp_increase"]
    ),
    total=st.integers(300, 5000),
    k_min=st.integers(1, 8),
    spread=st.integers(0, 12),
    data=st.data(),
)
def test_k_schedule_matches_official_and_is_monotone(mode, total, k_min, spread, data):
    k_max = k_min + spread
    step = data.draw(st.integers(0, 2 * total))
    k = mr.k_schedule(step, mode=mode, k_min=k_min, k_max=k_max, total_steps=total)
    assert k == official_calculate_gate_number(step, mode, total, k_min, k_max)
    later = mr.k_schedule(step + 1, mode=mode, k_min=k_min, k_max=k_max, total_steps=total)
    assert later >= k if "increase" in mode else later <= k


def test_k_schedule_errors():
    with pytest.raises(ValueError, match="mode"):
        mr.k_schedule(0, mode="square", k_min=1, k_max=2, total_steps=10)
    with pytest.raises(ValueError, match="k_min"):
        mr.k_schedule(0, mode="linear_increase", k_min=3, k_max=2, total_steps=10)
    with pytest.raises(ValueError, match="step"):
        mr.k_schedule(-1, mode="linear_increase", k_min=1, k_max=2, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        mr.k_schedule(0, mode="exp_increase", k_min=1, k_max=2, total_steps=10)


def test_evaluate_at_k():
    # Self-slimming evaluation: one callable, several k, results keyed by k in order.
    seen = []
    results = mr.evaluate_at_k(lambda k: seen.append(k) or 10.0 - k, [1, 2, 4, 8])
    assert results == {1: 9.0, 2: 8.0, 4: 6.0, 8: 2.0}
    assert seen == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="k"):
        mr.evaluate_at_k(lambda k: 0.0, [0])
    with pytest.raises(TypeError, match="evaluate"):
        mr.evaluate_at_k(3, [1])
