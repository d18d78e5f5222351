"""Capacity variants on every backend: BPR, minimum capacity, per-call k and capacity, padding."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import (
    assert_close,
    assert_plan_equal,
    assert_routing_equal,
    edge_case_logits,
    to_numpy,
)
from moerouter.testing.reference.plan import reference_padded_plan
from moerouter.testing.reference.token_choice import reference_null_experts, reference_topk

NUM_EXPERTS = 8

TOPK_CAPACITY = [
    # V-MoE batch prioritised routing: a token's first-choice probability ranks all its choices.
    pytest.param({"capacity_factor": 0.5, "drop_policy": "batch_priority"}, id="bpr"),
    # BPR with k = 1 (V-MoE's usual setting) and a capacity below 1.
    pytest.param({"k": 1, "capacity_factor": 0.5, "drop_policy": "batch_priority"}, id="bpr-k1"),
    # A minimum capacity that binds (the formula gives 1).
    pytest.param({"capacity_factor": 0.1, "min_capacity": 3}, id="min-capacity-binds"),
    # A minimum capacity that does not bind.
    pytest.param({"capacity_factor": 1.0, "min_capacity": 1}, id="min-capacity-slack"),
    # Minimum applied before rounding to a multiple of 4 (3 -> 4).
    pytest.param(
        {"capacity_factor": 0.1, "min_capacity": 3, "capacity_multiple_of": 4},
        id="min-then-multiple",
    ),
]


@pytest.mark.parametrize("options", TOPK_CAPACITY)
def test_topk_capacity_variants(backend, options):
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=50)
    options = {"k": 2, **options}
    routing = mr.TopK(num_experts=NUM_EXPERTS, **options)(backend.asarray(logits))
    k = options.pop("k")
    expected = reference_topk(logits, k, **options)
    assert_routing_equal(routing, expected)
    assert routing.capacity == expected["capacity"]


def test_bpr_drops_low_confidence_tokens_first(backend):
    # BPR's purpose: when capacity binds, tokens with the lowest top-1 probability lose their
    # slot, whatever their position. Every token prefers expert 0; later tokens are surer.
    logits = np.zeros((8, 4), np.float32)
    logits[:, 0] = np.arange(8, dtype=np.float32)  # token t's confidence grows with t
    router = mr.TopK(4, 1, capacity_factor=1.0, drop_policy="batch_priority")  # C = 2
    kept = to_numpy(router(backend.asarray(logits)).expert_ids) >= 0
    assert kept.tolist() == [False] * 6 + [True] * 2
    position = mr.TopK(4, 1, capacity_factor=1.0)(backend.asarray(logits))
    assert (to_numpy(position.expert_ids) >= 0).tolist() == [True] * 2 + [False] * 6


def test_per_call_k_and_capacity(backend):
    # Tutel-style runtime switch: one router, several k and capacity factors, each equal to a
    # router built with those values.
    logits = backend.asarray(edge_case_logits(2, 16, NUM_EXPERTS, seed=51))
    router = mr.TopK(NUM_EXPERTS, 2, capacity_factor=1.0)
    for k, capacity_factor in [(1, 0.5), (3, 1.25), (NUM_EXPERTS, 2.0), (2, None)]:
        routing = router(logits, k=k, capacity_factor=capacity_factor)
        built = mr.TopK(NUM_EXPERTS, k, capacity_factor=capacity_factor or 1.0)(logits)
        assert_routing_equal(routing, built, rtol=0.0, atol=0.0)


PADDED = [
    # Token choice, k = 2, capacity binds: some experts full, some with padding rows.
    pytest.param(lambda: mr.TopK(NUM_EXPERTS, 2, capacity_factor=0.75), id="topk"),
    # Capacity larger than any expert needs: every expert has padding rows.
    pytest.param(lambda: mr.TopK(NUM_EXPERTS, 2, capacity_factor=4.0), id="topk-roomy"),
    # BPR and a multiple of 4.
    pytest.param(
        lambda: mr.TopK(
            NUM_EXPERTS,
            1,
            capacity_factor=1.0,
            capacity_multiple_of=4,
            drop_policy="batch_priority",
        ),
        id="topk-bpr-multiple",
    ),
    # Null experts: null choices take no row.
    pytest.param(lambda: mr.NullExperts(4, 4, 2, capacity_factor=1.0), id="null"),
    # Expert choice: every expert exactly full except rows of non-finite tokens.
    pytest.param(lambda: mr.ExpertChoice(NUM_EXPERTS, capacity_factor=1.0), id="expert-choice"),
    # DeepSeek with groups.
    pytest.param(
        lambda: mr.DeepSeekTopK(NUM_EXPERTS, 2, num_groups=4, topk_groups=2, capacity_factor=1.0),
        id="deepseek",
    ),
]


@pytest.mark.parametrize("make_router", PADDED)
def test_padded_plan(backend, make_router):
    router = make_router()
    logits = backend.asarray(edge_case_logits(2, 16, 8, seed=52))  # 4 + 4 columns for nulls
    routing = router(logits)
    plan = mr.make_plan(routing, pad_to_capacity=True)
    expected = reference_padded_plan(routing)
    assert plan.capacity == expected["capacity"]
    assert plan.num_rows == routing.num_experts * plan.capacity
    assert_plan_equal(plan, expected)

    # The padded buffer is the packed one with gaps, padding rows zero; combine agrees.
    packed = mr.make_plan(routing)
    x_numpy = np.random.default_rng(53).standard_normal((32, 5)).astype(np.float32)
    x = backend.asarray(x_numpy)
    padded_rows, packed_rows = to_numpy(mr.dispatch(x, plan)), to_numpy(mr.dispatch(x, packed))
    sizes = to_numpy(packed.group_sizes)
    starts = np.cumsum(sizes) - sizes
    capacity = plan.capacity
    for e in range(routing.num_experts):
        n = sizes[e]
        block = padded_rows[e * capacity : (e + 1) * capacity]
        np.testing.assert_array_equal(block[:n], packed_rows[starts[e] : starts[e] + n])
        np.testing.assert_array_equal(block[n:], 0.0)
    y_padded = mr.combine(backend.asarray(padded_rows * 3.0), plan)
    y_packed = mr.combine(backend.asarray(packed_rows * 3.0), packed)
    # The padded combine runs on the agnostic path; a backend's packed kernel may round its
    # float32 sums differently (fused multiply-add), so equal to rounding, not bit for bit.
    assert_close(y_padded, to_numpy(y_packed), "y", rtol=1e-6, atol=1e-6)


def test_padded_plan_gradients_torch():
    # Gradients flow to x and to the routing weights through the padded path.
    torch = pytest.importorskip("torch")
    logits = torch.asarray(edge_case_logits(1, 16, 4, seed=54)[0]).requires_grad_()
    x = torch.randn(16, 3, requires_grad=True)
    plan = mr.make_plan(mr.TopK(4, 2, capacity_factor=0.75)(logits), pad_to_capacity=True)
    y = mr.combine(mr.dispatch(x, plan) * 2.0, plan)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all()


def test_padded_plan_errors(backend):
    routing = mr.TopK(4, 2)(backend.asarray(np.zeros((3, 4), np.float32)))
    with pytest.raises(ValueError, match="capacity"):  # dropless routing has no capacity
        mr.make_plan(routing, pad_to_capacity=True)
    with pytest.raises(TypeError, match="pad_to_capacity"):
        mr.make_plan(routing, pad_to_capacity=1)


NULL_CAPACITY = [
    # AdaMoE with batch prioritised routing: null choices take no slot.
    pytest.param({"capacity_factor": 0.5, "drop_policy": "batch_priority"}, id="bpr"),
    # A minimum capacity on real experts.
    pytest.param({"capacity_factor": 0.1, "min_capacity": 2}, id="min-capacity"),
]


@pytest.mark.parametrize("options", NULL_CAPACITY)
def test_null_experts_capacity_variants(backend, options):
    logits = edge_case_logits(2, 12, 6, seed=55)
    routing = mr.NullExperts(4, 2, 3, **options)(backend.asarray(logits))
    assert_routing_equal(routing, reference_null_experts(logits, 4, 2, 3, **options))


def test_null_experts_per_call(backend):
    # Per-call k and capacity_factor on AdaMoE equal a router built with them.
    logits = backend.asarray(edge_case_logits(2, 12, 6, seed=56))
    router = mr.NullExperts(4, 2, 3)
    routing = router(logits, k=2, capacity_factor=0.5)
    built = mr.NullExperts(4, 2, 2, capacity_factor=0.5)(logits)
    assert_routing_equal(routing, built, rtol=0.0, atol=0.0)


EXPERT_CHOICE_PER_CALL = [
    # Lower than the constructor's 2.0 (inference with less compute): C = 1.0 * 12 / 8 -> 2.
    pytest.param(1.0, id="lower"),
    # Rounded up twice: ceil(1.5 * 12 / 8) = 3, then to the multiple of 2, 4.
    pytest.param(1.5, id="rounded"),
    # Above S before the cap: every expert takes every token, non-finite rows as expert -1.
    pytest.param(50.0, id="capacity-above-S"),
]


@pytest.mark.parametrize("capacity_factor", EXPERT_CHOICE_PER_CALL)
def test_expert_choice_per_call_capacity(backend, capacity_factor):
    # Per-call capacity_factor on expert choice equals a router built with it.
    logits = backend.asarray(edge_case_logits(2, 12, NUM_EXPERTS, seed=57))
    router = mr.ExpertChoice(NUM_EXPERTS, capacity_factor=2.0, capacity_multiple_of=2)
    routing = router(logits, capacity_factor=capacity_factor)
    built = mr.ExpertChoice(NUM_EXPERTS, capacity_factor=capacity_factor, capacity_multiple_of=2)
    assert_routing_equal(routing, built(logits), rtol=0.0, atol=0.0)
    assert routing.slots == built.capacity(12) == router.capacity(12, capacity_factor)
    # The constructor's value stays the default.
    assert router(logits).slots == router.capacity(12) == 4  # ceil(2.0 * 12 / 8) = 3 -> 4


def test_capacity_option_errors(backend):
    # Bad per-call overrides and options name their parameter.
    logits = backend.asarray(np.zeros((4, 8), np.float32))
    router = mr.TopK(NUM_EXPERTS, 2)
    with pytest.raises(ValueError, match="k"):
        router(logits, k=NUM_EXPERTS + 1)
    with pytest.raises(TypeError, match="k"):
        router(logits, k=1.5)
    with pytest.raises(ValueError, match="capacity_factor"):
        router(logits, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="min_capacity"):
        mr.TopK(NUM_EXPERTS, 2, min_capacity=-2)
    with pytest.raises(ValueError, match="drop_policy"):
        mr.TopK(NUM_EXPERTS, 2, drop_policy="bpr")
    with pytest.raises(ValueError, match="k"):
        mr.NullExperts(4, 2, 3)(backend.asarray(np.zeros((4, 6), np.float32)), k=7)
    with pytest.raises(ValueError, match="capacity_factor"):
        mr.ExpertChoice(NUM_EXPERTS)(logits, capacity_factor=0.0)
