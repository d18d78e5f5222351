"""DeepSeekTopK and update_expert_bias on every backend against the float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy
from moerouter.testing.reference.token_choice import (
    reference_deepseek,
    reference_topk,
    reference_update_expert_bias,
)

NUM_EXPERTS = 8


def random_bias(seed: int, num_experts: int = NUM_EXPERTS) -> np.ndarray:
    # Biases on the scale of the scores, so they really move selections.
    return (np.random.default_rng(seed).standard_normal(num_experts) * 0.3).astype(np.float32)


CASES = [
    # DeepSeek-V3 as released, scaled down: sigmoid, 4 groups keep 2, top-2 sum, bias, gamma 2.5.
    pytest.param(
        {"k": 3, "num_groups": 4, "topk_groups": 2, "routed_scaling_factor": 2.5},
        True,
        id="v3-groups-bias",
    ),
    # No groups, no bias: sigmoid top-k renormalised (the TopK sigmoid case).
    pytest.param({"k": 2}, False, id="plain-sigmoid"),
    # Bias without groups: selection by score + bias, weights by the score alone.
    pytest.param({"k": 2}, True, id="bias-only"),
    # DeepSeek-V2 style: softmax scores, max group score, raw (not renormalised) weights.
    pytest.param(
        {
            "k": 2,
            "num_groups": 4,
            "topk_groups": 1,
            "score": "softmax",
            "group_score": "max",
            "normalize": False,
        },
        False,
        id="v2-softmax-max-group",
    ),
    # k equals every eligible expert: all of the kept groups, -inf entries become expert -1.
    pytest.param({"k": 4, "num_groups": 4, "topk_groups": 2}, True, id="k-equals-eligible"),
    # Groups of one expert: the group score is the expert's own score.
    pytest.param({"k": 2, "num_groups": 8, "topk_groups": 3}, True, id="groups-of-one"),
    # Capacity with position priority, k-major.
    pytest.param(
        {"k": 2, "num_groups": 2, "topk_groups": 1, "capacity_factor": 0.75},
        True,
        id="capacity-position",
    ),
    # Capacity by unbiased score, ties by position.
    pytest.param(
        {"k": 2, "capacity_factor": 0.75, "drop_policy": "probs"}, True, id="capacity-probs"
    ),
    # Batch prioritised routing with a minimum capacity that binds and a multiple of 4.
    pytest.param(
        {
            "k": 2,
            "capacity_factor": 0.1,
            "min_capacity": 3,
            "capacity_multiple_of": 2,
            "drop_policy": "batch_priority",
        },
        True,
        id="capacity-bpr-min",
    ),
]


@pytest.mark.parametrize(("options", "with_bias"), CASES)
def test_deepseek(backend, options, with_bias):
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=21)
    bias = random_bias(22) if with_bias else None
    router = mr.DeepSeekTopK(num_experts=NUM_EXPERTS, **options)
    routing = router(backend.asarray(logits), None if bias is None else backend.asarray(bias))
    k = options["k"]
    rest = {name: value for name, value in options.items() if name != "k"}
    expected = reference_deepseek(logits, k, bias, **rest)
    assert_routing_equal(routing, expected)
    assert routing.capacity == expected["capacity"]


def test_deepseek_2d_and_per_call_overrides(backend):
    # Two-dimensional logits; k and capacity_factor replaced for one call only.
    logits = edge_case_logits(1, 24, NUM_EXPERTS, seed=23)[0]
    bias = random_bias(24)
    router = mr.DeepSeekTopK(num_experts=NUM_EXPERTS, k=2, num_groups=4, topk_groups=2)
    routing = router(backend.asarray(logits), backend.asarray(bias), k=3, capacity_factor=0.5)
    expected = reference_deepseek(logits, 3, bias, num_groups=4, topk_groups=2, capacity_factor=0.5)
    assert_routing_equal(routing, expected)
    # The constructor's values are untouched.
    assert_routing_equal(
        router(backend.asarray(logits), backend.asarray(bias)),
        reference_deepseek(logits, 2, bias, num_groups=4, topk_groups=2),
    )


def test_without_bias_or_groups_is_sigmoid_topk(backend):
    # Invariant: DeepSeekTopK with no bias and one group is TopK(score="sigmoid") (no near-ties
    # in these logits: sigmoid keeps their order).
    logits = backend.asarray(edge_case_logits(2, 16, NUM_EXPERTS, seed=25))
    deepseek = mr.DeepSeekTopK(num_experts=NUM_EXPERTS, k=2, capacity_factor=0.75)(logits)
    topk = mr.TopK(num_experts=NUM_EXPERTS, k=2, score="sigmoid", capacity_factor=0.75)(logits)
    assert_routing_equal(deepseek, topk)
    assert_routing_equal(topk, reference_topk(logits, 2, score="sigmoid", capacity_factor=0.75))


def test_bias_selects_but_does_not_weigh(backend):
    # A large bias on expert 5 puts it first for every token, but its weight is its unbiased
    # score share, exactly as without the bias when it is chosen anyway.
    logits = np.random.default_rng(26).standard_normal((12, NUM_EXPERTS)).astype(np.float32)
    bias = np.zeros(NUM_EXPERTS, np.float32)
    bias[5] = 100.0
    router = mr.DeepSeekTopK(num_experts=NUM_EXPERTS, k=2, routed_scaling_factor=2.0)
    routing = router(backend.asarray(logits), backend.asarray(bias))
    experts = to_numpy(routing.expert_ids).reshape(12, 2)
    assert np.all(experts[:, 0] == 5)
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    chosen = np.take_along_axis(scores, experts, axis=1)
    expected = 2.0 * chosen / chosen.sum(axis=1, keepdims=True)
    assert_close(to_numpy(routing.weights).reshape(12, 2), expected, "weights")


def test_group_limit_keeps_choices_inside_kept_groups(backend):
    # Invariant: with topk_groups groups kept, each token's experts span at most that many groups.
    logits = np.random.default_rng(27).standard_normal((2, 20, 16)).astype(np.float32)
    router = mr.DeepSeekTopK(num_experts=16, k=4, num_groups=8, topk_groups=2)
    experts = to_numpy(router(backend.asarray(logits)).expert_ids).reshape(40, 4)
    for row in experts:
        assert len({int(e) // 2 for e in row}) <= 2


BIAS_UPDATES = [
    # One layer, integer counts: over-loaded down, under-loaded up, average unchanged.
    pytest.param((8,), "int32", 1e-3, id="int-counts"),
    # Per-layer biases (L, E) with float counts.
    pytest.param((3, 8), "float32", 0.01, id="per-layer-float-counts"),
    # Rate 0 leaves the bias as it is.
    pytest.param((8,), "int32", 0.0, id="rate-zero"),
]


@pytest.mark.parametrize(("shape", "count_dtype", "rate"), BIAS_UPDATES)
def test_update_expert_bias(backend, shape, count_dtype, rate):
    rng = np.random.default_rng(28)
    bias = (rng.standard_normal(shape) * 0.01).astype(np.float32)
    counts = rng.integers(0, 6, size=shape).astype(count_dtype)
    counts[..., 0] = counts[..., 1]  # equal loads in one row
    updated = mr.update_expert_bias(backend.asarray(bias), backend.asarray(counts), rate)
    assert to_numpy(updated).dtype == np.float32
    assert_close(updated, reference_update_expert_bias(bias, counts, rate), "bias")


def test_bias_update_balances_a_skewed_router(backend):
    # Aux-loss-free balancing in action: logits strongly prefer expert 0; a few hundred sign
    # dozen sign updates of the bias spread the load (max/mean load falls well below the start).
    rng = np.random.default_rng(29)
    logits = backend.asarray(
        (rng.standard_normal((64, 4)) + np.array([3.0, 0.0, 0.0, 0.0])).astype(np.float32)
    )
    router = mr.DeepSeekTopK(num_experts=4, k=1)
    bias = backend.asarray(np.zeros(4, np.float32))

    def max_over_mean(bias):
        counts = mr.stats.summary(router(logits, bias))["tokens_per_expert"]
        return float(np.max(to_numpy(counts))) / 16.0, counts

    start, _ = max_over_mean(bias)
    for _ in range(40):
        _, counts = max_over_mean(bias)
        bias = mr.update_expert_bias(bias, counts, 0.05)
    end, _ = max_over_mean(bias)
    assert start > 3.0
    assert end < 1.5


ERRORS = [
    # Groups must split the experts evenly.
    pytest.param({"num_experts": 8, "k": 2, "num_groups": 3}, ValueError, "num_groups", id="g"),
    # Cannot keep more groups than exist.
    pytest.param(
        {"num_experts": 8, "k": 2, "num_groups": 4, "topk_groups": 5},
        ValueError,
        "topk_groups",
        id="topk-groups",
    ),
    # k larger than the experts of the kept groups.
    pytest.param(
        {"num_experts": 8, "k": 5, "num_groups": 4, "topk_groups": 2}, ValueError, "k", id="k"
    ),
    # A zero scaling factor would silence the layer.
    pytest.param(
        {"num_experts": 8, "k": 2, "routed_scaling_factor": 0.0},
        ValueError,
        "routed_scaling_factor",
        id="scale",
    ),
    # Unknown score function.
    pytest.param({"num_experts": 8, "k": 2, "score": "relu"}, ValueError, "score", id="score"),
    # Unknown drop policy.
    pytest.param(
        {"num_experts": 8, "k": 2, "drop_policy": "random"}, ValueError, "drop_policy", id="drop"
    ),
    # Negative minimum capacity.
    pytest.param(
        {"num_experts": 8, "k": 2, "min_capacity": -1}, ValueError, "min_capacity", id="min-cap"
    ),
]


@pytest.mark.parametrize(("options", "error", "name"), ERRORS)
def test_constructor_errors(options, error, name):
    with pytest.raises(error, match=name):
        mr.DeepSeekTopK(**options)


def test_call_errors(backend, xp):
    router = mr.DeepSeekTopK(num_experts=4, k=2)
    logits = backend.asarray(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="bias"):  # wrong length
        router(logits, backend.asarray(np.zeros(3, np.float32)))
    with pytest.raises(TypeError, match="bias"):  # integer bias
        router(logits, backend.asarray(np.zeros(4, np.int32)))
    with pytest.raises(TypeError, match="bias"):  # not an array
        router(logits, [0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="k"):  # per-call k too large
        router(logits, k=5)
    with pytest.raises(ValueError, match="capacity_factor"):  # per-call capacity <= 0
        router(logits, capacity_factor=0.0)
    bias = backend.asarray(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="rate"):
        mr.update_expert_bias(bias, backend.asarray(np.ones(4, np.int32)), -1.0)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        mr.update_expert_bias(bias, backend.asarray(np.ones(3, np.int32)), 0.1)
    with pytest.raises(TypeError, match="bias"):
        mr.update_expert_bias(backend.asarray(np.zeros(4, np.int32)), bias, 0.1)


def test_mixed_backend_bias_is_rejected():
    # A NumPy bias with array_api_strict logits is two backends: a TypeError naming bias.
    strict = pytest.importorskip("array_api_strict")
    router = mr.DeepSeekTopK(num_experts=4, k=2)
    with pytest.raises(TypeError, match="bias"):
        router(strict.zeros((3, 4)), np.zeros(4, np.float32))
