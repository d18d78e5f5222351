"""Property tests of the losses and statistics: random sizes, ties, -inf, masks and splits.

Edge sizes come up by construction (T = 1, E = 1, k = E, capacity below and above S); logits are
small integers and -inf, so ties are the rule. Every value is compared with the float64
references and with invariants. NumPy and array_api_strict only: no framework needed.
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
    assert_close,
    reference_co_occurrence,
    reference_concatenated_load_balancing,
    reference_entropy,
    reference_importance_loss,
    reference_load_balancing,
    reference_processed_by_at_least,
    reference_sequence_load_balancing,
    reference_z_loss,
    to_numpy,
)

BACKENDS = [
    # The agnostic path on NumPy arrays.
    pytest.param(Backend.NUMPY, id="numpy"),
    # array_api_strict: nothing NumPy-only in the losses.
    pytest.param(Backend.ARRAY_API_STRICT, id="array_api_strict"),
]

PROPERTY = settings(max_examples=25, deadline=None, database=None)
RTOL = 2.0**-15


@st.composite
def routed(draw):
    """A routing of random (G, S, E') logits by a random policy, and a random (G, S) mask."""
    groups = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 8))
    experts = draw(st.integers(1, 5))
    policy = draw(st.sampled_from(["topk", "null", "expert_choice"]))
    num_null = draw(st.integers(1, 3)) if policy == "null" else 0
    columns = experts + num_null
    k = draw(st.integers(1, columns))
    entries = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, -math.inf])
    flat = draw(st.lists(entries, min_size=groups * group_size * columns, max_size=10_000))
    logits = np.asarray(flat[: groups * group_size * columns], np.float32)
    logits = logits.reshape(groups, group_size, columns)
    capacity = draw(st.sampled_from([None, 0.5, 1.0, 4.0]))
    if policy == "topk":
        router = mr.TopK(num_experts=experts, k=k, capacity_factor=capacity)
    elif policy == "null":
        router = mr.NullExperts(num_experts=experts, num_null=num_null, k=k)
    else:
        router = mr.ExpertChoice(num_experts=experts, capacity_factor=capacity or 2.0)
    mask = np.asarray(
        draw(st.lists(st.booleans(), min_size=groups * group_size, max_size=groups * group_size))
    ).reshape(groups, group_size)
    return logits, router, mask


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=routed())
def test_losses_and_stats_against_references(backend, case):
    logits, router, mask = case
    routing = router(backend.asarray(logits))
    device_mask = backend.asarray(mask)
    for convention in ("megatron", "mixtral", "gshard"):
        loss = mr.losses.load_balancing(routing, convention=convention, mask=device_mask)
        expected = reference_load_balancing(routing, convention, mask)
        assert_close(loss, expected, convention, rtol=RTOL)
    assert_close(
        mr.losses.z_loss(backend.asarray(logits), mask=device_mask),
        reference_z_loss(logits, mask),
        "z_loss",
        rtol=RTOL,
    )
    for source in ("weights", "probs"):
        loss = mr.losses.importance_loss(routing, source=source, mask=device_mask)
        expected = reference_importance_loss(routing, source, mask)
        assert_close(loss, expected, source, rtol=4 * RTOL, atol=1e-6)
        assert float(to_numpy(loss)) >= 0.0
    entropy = mr.losses.entropy(routing, mask=device_mask)
    assert_close(entropy, reference_entropy(routing, mask), "entropy", rtol=RTOL, atol=1e-7)
    assert -1e-6 <= float(to_numpy(entropy)) <= math.log(routing.num_choices) + 1e-5
    if routing.layout == "token":
        loss = mr.losses.sequence_load_balancing(routing, mask=device_mask)
        expected = reference_sequence_load_balancing(routing, 1.0, mask)
        assert_close(loss, expected, "sequence", rtol=RTOL)

    counts = to_numpy(mr.stats.co_occurrence(routing, mask=device_mask))
    np.testing.assert_array_equal(counts, reference_co_occurrence(routing, mask))
    np.testing.assert_array_equal(counts, counts.T)
    ratios = to_numpy(mr.stats.processed_by_at_least(routing, mask=device_mask))
    expected = reference_processed_by_at_least(routing, None, mask)
    np.testing.assert_allclose(ratios, expected, rtol=RTOL, atol=1e-7)
    assert np.all(np.diff(ratios) <= 1e-7)
    # Unmasked: the diagonal is the tokens per expert, and the ratios read the summary's histogram.
    summary = mr.stats.summary(routing)
    diagonal = np.diag(to_numpy(mr.stats.co_occurrence(routing)))
    np.testing.assert_array_equal(diagonal, to_numpy(summary["tokens_per_expert"]))
    np.testing.assert_allclose(
        to_numpy(summary["processed_by_at_least"]),
        to_numpy(mr.stats.processed_by_at_least(routing)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    experts=st.integers(1, 5),
    data=st.data(),
)
def test_state_over_any_split_equals_the_whole(backend, sizes, experts, data):
    # Any split of a batch into micro-batches (with any padding masks) accumulates to the loss of
    # the concatenated valid tokens.
    k = data.draw(st.integers(1, experts))
    router = mr.TopK(num_experts=experts, k=k)
    state = mr.losses.balance_state_init(experts, xp=backend.namespace())
    routings, masks = [], []
    for size in sizes:
        values = data.draw(
            st.lists(
                st.sampled_from([-1.0, 0.0, 1.0, 2.0]),
                min_size=size * experts,
                max_size=size * experts,
            )
        )
        mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
        routing = router(backend.asarray(np.float32(values).reshape(size, experts)))
        state = mr.losses.accumulate(state, routing, mask=backend.asarray(mask))
        routings.append(routing)
        masks.append(mask)
    for convention in ("megatron", "mixtral"):
        loss = mr.losses.load_balancing_from_state(state, convention=convention)
        expected = reference_concatenated_load_balancing(routings, convention, masks)
        assert_close(loss, expected, convention, rtol=RTOL)
    assert int(to_numpy(state.tokens)) == int(sum(m.sum() for m in masks))
    assert int(to_numpy(state.counts).sum()) == k * int(to_numpy(state.tokens))
