"""Sinkhorn, BASE balanced-assignment and sparsity-constrained routers on every backend.

Each policy is compared with its float64 loop twin in
:mod:`moerouter.testing.reference.transport`: decisions identical, weights and probabilities
within the float32 tolerance. Inputs are :func:`~moerouter.testing.edge_case_logits` (random rows
plus -inf entries, NaN, +inf and all -inf rows, ties inside a row and between tokens).
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy
from moerouter.testing.reference.transport import (
    reference_balanced_assignment,
    reference_sinkhorn_expert_choice,
    reference_sinkhorn_plan,
    reference_sinkhorn_token_choice,
    reference_sparsity_constrained_expert_choice,
)

NUM_EXPERTS = 8
NOISE = np.random.default_rng(30).standard_normal((2, 16, NUM_EXPERTS)).astype(np.float32) / 8

TOKEN_CHOICE = [
    # vmoe's Sinkhorn token choice: eps = 1, 20 iterations, raw softmax weights, k = 1.
    pytest.param({"k": 1}, False, id="vmoe-k1"),
    # k = 2 renormalised (Mixtral-style weights on a Sinkhorn selection).
    pytest.param({"k": 2, "normalize": True}, False, id="k2-normalize"),
    # Noise with the vmoe token-choice quirk: combine from the clean logits.
    pytest.param({"k": 2, "noisy_combine": False}, True, id="noise-clean-combine"),
    # Noise, combine from the noisy logits (the default).
    pytest.param({"k": 2}, True, id="noise-noisy-combine"),
    # Capacity drops, k-major, by position.
    pytest.param({"k": 2, "capacity_factor": 0.75}, False, id="capacity-position"),
    # Capacity drops by probability; duplicated rows tie, broken by position.
    pytest.param(
        {"k": 2, "capacity_factor": 0.75, "drop_policy": "probs"}, False, id="capacity-probs"
    ),
    # Sharper plan (small epsilon) with more iterations.
    pytest.param({"k": 2, "epsilon": 0.25, "num_iters": 40}, False, id="small-epsilon"),
    # k = E: every column chosen, -inf ones as expert -1.
    pytest.param({"k": NUM_EXPERTS}, False, id="k-equals-E"),
]


@pytest.mark.parametrize(("options", "noisy"), TOKEN_CHOICE)
def test_sinkhorn_token_choice(backend, options, noisy):
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=31)
    noise = NOISE if noisy else None
    router = mr.SinkhornTokenChoice(num_experts=NUM_EXPERTS, **options)
    routing = router(backend.asarray(logits), None if noise is None else backend.asarray(noise))
    k = options["k"]
    rest = {name: value for name, value in options.items() if name != "k"}
    assert_routing_equal(routing, reference_sinkhorn_token_choice(logits, k, noise=noise, **rest))


EXPERT_CHOICE = [
    # vmoe's Sinkhorn expert choice, cf 2 over groups.
    pytest.param({"capacity_factor": 2.0}, False, (2, 16), id="cf2-groups"),
    # Noisy plan and noisy combine (vmoe's EC code).
    pytest.param({"capacity_factor": 1.0}, True, (2, 16), id="noise"),
    # Noisy plan, clean combine.
    pytest.param(
        {"capacity_factor": 1.0, "noisy_combine": False}, True, (2, 16), id="noise-clean-combine"
    ),
    # C > S before the cap: every expert takes every token, unroutable pairs as expert -1.
    pytest.param({"capacity_factor": 50.0}, False, (2, 16), id="capacity-above-S"),
    # C rounded up to a multiple of 4.
    pytest.param({"capacity_factor": 0.5, "capacity_multiple_of": 4}, False, (2, 16), id="mult4"),
]


@pytest.mark.parametrize(("options", "noisy", "groups"), EXPERT_CHOICE)
def test_sinkhorn_expert_choice(backend, options, noisy, groups):
    logits = edge_case_logits(*groups, NUM_EXPERTS, seed=32)
    noise = NOISE[: groups[0], : groups[1]] if noisy else None
    router = mr.SinkhornExpertChoice(num_experts=NUM_EXPERTS, **options)
    routing = router(backend.asarray(logits), None if noise is None else backend.asarray(noise))
    cf = options["capacity_factor"]
    rest = {name: value for name, value in options.items() if name != "capacity_factor"}
    assert_routing_equal(routing, reference_sinkhorn_expert_choice(logits, cf, noise=noise, **rest))


@pytest.mark.parametrize(
    ("epsilon", "num_iters"),
    [
        # vmoe's setting.
        pytest.param(1.0, 20, id="vmoe"),
        # Sharp plan: large scaled logits, log-domain stability matters.
        pytest.param(0.05, 100, id="sharp"),
    ],
)
def test_sinkhorn_plan(backend, epsilon, num_iters):
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=33)
    plan = mr.policies.sinkhorn_plan(backend.asarray(logits), epsilon=epsilon, num_iters=num_iters)
    expected = reference_sinkhorn_plan(logits, epsilon=epsilon, num_iters=num_iters)
    # Plan entries accumulate num_iters rounds of float32 log-sum-exp error.
    assert_close(plan, expected, "plan", rtol=1e-4, atol=1e-5)
    # Invariants: finite rows sum to 1 exactly (last update), others are 0.
    plan = to_numpy(plan)
    finite = np.isfinite(logits).all(-1) | (np.isneginf(logits).any(-1) & ~np.isnan(logits).any(-1))
    rows = plan.sum(-1)
    assert np.all(np.abs(rows[rows > 0] - 1.0) < 1e-5)
    assert np.all(plan >= 0) and finite.shape == rows.shape


def test_sinkhorn_plan_balances_columns(backend):
    # With all rows finite and enough iterations, every column carries S / E tokens of mass.
    logits = np.random.default_rng(34).standard_normal((2, 16, NUM_EXPERTS)).astype(np.float32)
    plan = to_numpy(mr.policies.sinkhorn_plan(backend.asarray(logits), num_iters=100))
    np.testing.assert_allclose(plan.sum(axis=1), 2.0, rtol=1e-4)
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, rtol=1e-5)


BALANCED = [
    # Default epsilon and iterations, grouped, every edge-case row.
    pytest.param({}, id="defaults"),
    # vmoe-like soft plan: the rounding does more of the work.
    pytest.param({"epsilon": 1.0, "num_iters": 20}, id="soft-plan"),
]


@pytest.mark.parametrize("options", BALANCED)
def test_balanced_assignment(backend, options):
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=36)
    routing = mr.BalancedAssignment(num_experts=NUM_EXPERTS, **options)(backend.asarray(logits))
    assert_routing_equal(routing, reference_balanced_assignment(logits, **options))


@pytest.mark.parametrize(
    ("capacity_factor", "groups"),
    [
        # vmoe's EC setting, grouped.
        pytest.param(1.0, (2, 16), id="cf1-groups"),
        # Sparser columns than tokens an expert takes: zero-plan tokens fill by index.
        pytest.param(2.0, (2, 16), id="cf2"),
        # C = S: the k-sparse projection is plain sparsemax.
        pytest.param(50.0, (2, 16), id="capacity-above-S"),
    ],
)
def test_sparsity_constrained_expert_choice(backend, capacity_factor, groups):
    logits = edge_case_logits(*groups, NUM_EXPERTS, seed=35)
    router = mr.SparsityConstrainedExpertChoice(
        num_experts=NUM_EXPERTS, capacity_factor=capacity_factor
    )
    routing = router(backend.asarray(logits))
    reference = reference_sparsity_constrained_expert_choice(logits, capacity_factor)
    assert_routing_equal(routing, reference)
