"""Property tests: random sizes, ties and groups, checked against invariants and the references.

Logits are small integers (and -inf), so ties inside rows and between tokens are the rule, not the
exception. Runs on NumPy (with its fast plan kernels) and array_api_strict (the agnostic path), so
it needs no framework.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moerouter as mr
from moerouter.testing import (
    Backend,
    assert_plan_equal,
    assert_plan_valid,
    assert_routing_equal,
    reference_make_plan,
    reference_topk,
    to_numpy,
)
from moerouter.testing.reference.capacity import reference_capacity
from moerouter.testing.reference.token_choice import reference_null_experts

BACKENDS = [
    # The built-in NumPy plugin: fast make_plan/dispatch/combine kernels.
    pytest.param(Backend.NUMPY, id="numpy"),
    # array_api_strict: the agnostic path, and proof nothing relies on NumPy-only behaviour.
    pytest.param(Backend.ARRAY_API_STRICT, id="array_api_strict"),
]

# Modest example counts and no deadline keep the suite fast and free of timing flakes; no
# database, so a run leaves nothing behind in the checkout.
PROPERTY = settings(max_examples=30, deadline=None, database=None)


@st.composite
def logits_and_k(draw, extra_columns=0):
    groups = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 10))
    experts = draw(st.integers(1, 6))
    columns = experts + extra_columns
    k = draw(st.integers(1, columns))
    entries = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, -math.inf])
    flat = draw(st.lists(entries, min_size=groups * group_size * columns, max_size=10_000))
    logits = np.asarray(flat[: groups * group_size * columns], np.float32)
    logits = logits.reshape(groups, group_size, columns)
    return (logits if groups > 1 or draw(st.booleans()) else logits[0]), experts, k


CAPACITIES = st.sampled_from([None, 0.25, 0.5, 1.0, 1.5])


def check_plan(backend, routing):
    plan = mr.make_plan(routing)
    assert_plan_valid(plan, routing)
    assert_plan_equal(plan, reference_make_plan(routing), rtol=0.0, atol=0.0)
    # Combining ones gives each token the sum of its kept weights.
    ones = backend.asarray(np.ones((plan.num_rows, 1), np.float32))
    totals = to_numpy(mr.combine(ones, plan))[:, 0]
    expected = np.zeros(routing.num_tokens)
    np.add.at(expected, to_numpy(routing.token_ids), to_numpy(routing.weights))
    np.testing.assert_allclose(totals, expected, rtol=1e-6, atol=1e-7)
    return plan


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(
    case=logits_and_k(), capacity_factor=CAPACITIES, score=st.sampled_from(["softmax", "sigmoid"])
)
def test_topk_properties(backend, case, capacity_factor, score):
    logits, experts, k = case
    router = mr.TopK(num_experts=experts, k=k, score=score, capacity_factor=capacity_factor)
    routing = router(backend.asarray(logits))
    # Ties inside a row are exact, and position priority does not compare probabilities: the
    # decision must equal the reference's bit for bit.
    assert_routing_equal(
        routing, reference_topk(logits, k, score=score, capacity_factor=capacity_factor)
    )
    grouped = logits.reshape(-1, logits.shape[-2], experts)
    values = grouped.reshape(-1, experts)
    choice = to_numpy(routing.choice_ids).reshape(-1, k)
    expert_ids = to_numpy(routing.expert_ids).reshape(-1, k)
    weights = to_numpy(routing.weights).reshape(-1, k)
    finite = to_numpy(routing.finite_rows)
    chosen = np.take_along_axis(values, choice, axis=1)
    # Slots in descending order, distinct experts, ties to the lower index.
    assert np.all(chosen[finite][:, :-1] >= chosen[finite][:, 1:])
    assert all(len(set(row)) == k for row in choice.tolist())
    for row, picked in zip(values[finite], choice[finite], strict=True):
        ranked = sorted(range(experts), key=lambda j, row=row: (-row[j], j))[:k]
        assert picked.tolist() == ranked
    # No weight without an expert; normalised weights sum to 1 unless capacity dropped some.
    assert np.all(weights[expert_ids < 0] == 0) and np.all(weights >= 0)
    if capacity_factor is None:
        np.testing.assert_allclose(weights[finite].sum(axis=1), 1.0, rtol=1e-6)
    else:
        capacity = reference_capacity(capacity_factor, grouped.shape[1], k, experts)
        per_group = expert_ids.reshape(grouped.shape[0], -1)
        for group in per_group:
            assert np.all(np.bincount(group[group >= 0], minlength=experts) <= capacity)
    check_plan(backend, routing)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(
    case=logits_and_k(extra_columns=3),
    capacity_factor=CAPACITIES,
)
def test_null_experts_properties(backend, case, capacity_factor):
    logits, experts, k = case
    nulls = logits.shape[-1] - experts
    router = mr.NullExperts(
        num_experts=experts, num_null=nulls, k=k, capacity_factor=capacity_factor
    )
    routing = router(backend.asarray(logits))
    reference = reference_null_experts(logits, experts, nulls, k, capacity_factor=capacity_factor)
    assert_routing_equal(routing, reference)
    choice = to_numpy(routing.choice_ids).reshape(-1, k)
    expert_ids = to_numpy(routing.expert_ids).reshape(-1, k)
    weights = to_numpy(routing.weights).reshape(-1, k)
    # Null choices never reach an expert; kept real weights sum to 1, or 0 when none is real.
    assert np.all(expert_ids[choice >= experts] == -1)
    if capacity_factor is None:
        sums = weights.sum(axis=1)
        any_real = (expert_ids >= 0).any(axis=1)
        np.testing.assert_allclose(sums[any_real], 1.0, rtol=1e-6)
        assert np.all(sums[~any_real] == 0)
    check_plan(backend, routing)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(
    case=logits_and_k(),
    capacity_factor=st.sampled_from([0.5, 1.0, 2.0, 100.0]),
    multiple_of=st.sampled_from([1, 4]),
)
def test_expert_choice_properties(backend, case, capacity_factor, multiple_of):
    logits, experts, _ = case
    router = mr.ExpertChoice(
        num_experts=experts, capacity_factor=capacity_factor, capacity_multiple_of=multiple_of
    )
    routing = router(backend.asarray(logits))
    grouped = logits.reshape(-1, logits.shape[-2], experts)
    num_groups, group_size = grouped.shape[:2]
    capacity = min(
        reference_capacity(capacity_factor, group_size, 1, experts, multiple_of), group_size
    )
    assert routing.slots == capacity and routing.layout == "expert"
    tokens = to_numpy(routing.token_ids).reshape(num_groups, experts, capacity)
    expert_ids = to_numpy(routing.expert_ids).reshape(num_groups, experts, capacity)
    weights = to_numpy(routing.weights).reshape(num_groups, experts, capacity)
    probs = to_numpy(routing.probs).reshape(num_groups, group_size, experts)
    finite = to_numpy(routing.finite_rows).reshape(num_groups, group_size)
    for g in range(num_groups):
        for e in range(experts):
            # Each expert takes exactly C distinct tokens of its own group: the top C by its own
            # float32 probabilities among tokens with a finite row and a logit above -inf, ties
            # to the lower token index; slots left over hold the other tokens in token order,
            # as expert -1 (a -inf logit is never routed to).
            usable = finite[g] & (grouped[g, :, e] > -np.inf)
            ranking = np.where(usable, probs[g, :, e], -1.0)
            best = sorted(range(group_size), key=lambda s, r=ranking: (-r[s], s))[:capacity]
            assert (tokens[g, e] - g * group_size).tolist() == best
            kept = usable[best]
            assert np.all(expert_ids[g, e][kept] == e) and np.all(expert_ids[g, e][~kept] == -1)
            np.testing.assert_array_equal(weights[g, e], np.where(kept, probs[g, best, e], 0))
    check_plan(backend, routing)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=logits_and_k())
def test_probs_drop_policy_ranks_its_own_probabilities(backend, case):
    # With drop_policy="probs", within one choice rank tokens are served by descending float32
    # probability (as the routing reports it), ties by position; k-major across ranks.
    logits, experts, k = case
    router = mr.TopK(num_experts=experts, k=k, capacity_factor=0.5, drop_policy="probs")
    routing = router(backend.asarray(logits))
    free = reference_topk(logits, k)  # the same choices before capacity
    grouped = logits.reshape(-1, logits.shape[-2], experts)
    num_groups, group_size = grouped.shape[:2]
    capacity = reference_capacity(0.5, group_size, k, experts)
    probs = to_numpy(routing.probs).reshape(num_groups, group_size, experts)
    choice = free["choice_ids"].reshape(num_groups, group_size, k)
    expected = free["expert_ids"].reshape(num_groups, group_size, k).copy()
    for g in range(num_groups):
        used = np.zeros(experts, int)
        for slot in range(k):
            chosen = probs[g, np.arange(group_size), choice[g, :, slot]]
            for s in sorted(range(group_size), key=lambda s, c=chosen: (-c[s], s)):
                e = expected[g, s, slot]
                if e >= 0:
                    if used[e] < capacity:
                        used[e] += 1
                    else:
                        expected[g, s, slot] = -1
    np.testing.assert_array_equal(to_numpy(routing.expert_ids), expected.reshape(-1))
