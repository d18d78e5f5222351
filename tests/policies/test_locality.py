"""LocMoE / LocMoE+ (moerouter.policies.locality) on every backend against the references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy
from moerouter.testing.reference.locality import (
    reference_affinity_routing,
    reference_affinity_scores,
    reference_grouped_average_pooling,
    reference_locality_loss,
    reference_locality_topk,
)

NUM_EXPERTS = 8
NUM_NODES = 4


def nodes(num_tokens, seed=0):
    return np.random.default_rng(seed).integers(0, NUM_NODES, size=num_tokens).astype(np.int32)


LOCALITY_CASES = [
    # Purely local: every choice on the token's own node (k = experts per node).
    pytest.param({"k": 2, "max_nodes": 1}, id="local-only"),
    # Own node plus the best other node, DeepSeek-style node scores.
    pytest.param({"k": 3, "max_nodes": 2}, id="two-nodes"),
    # Every node allowed: must equal plain top-k.
    pytest.param({"k": 2, "max_nodes": NUM_NODES}, id="all-nodes"),
    # Raw probabilities as weights.
    pytest.param({"k": 2, "max_nodes": 2, "normalize": False}, id="raw-weights"),
    # Capacity with k-major position priority.
    pytest.param({"k": 2, "max_nodes": 2, "capacity_factor": 0.75}, id="capacity-position"),
    # Capacity with probability priority.
    pytest.param(
        {"k": 2, "max_nodes": 2, "capacity_factor": 0.75, "drop_policy": "probs"},
        id="capacity-probs",
    ),
]


@pytest.mark.parametrize("options", LOCALITY_CASES)
def test_locality_topk(backend, options):
    # (G, S, E) edge cases: -inf entries, NaN/+inf/all -inf rows, ties.
    logits = edge_case_logits(2, 12, NUM_EXPERTS, seed=1)
    token_nodes = nodes(24, seed=1)
    router = mr.policies.LocalityTopK(num_experts=NUM_EXPERTS, num_nodes=NUM_NODES, **options)
    routing = router(backend.asarray(logits), backend.asarray(token_nodes))
    want = reference_locality_topk(logits, token_nodes, num_nodes=NUM_NODES, **options)
    assert_routing_equal(routing, want)
    if options["max_nodes"] == 1:  # invariant: local-only never leaves the node
        experts = to_numpy(routing.expert_ids).reshape(24, -1)
        real = experts >= 0
        node_of = experts // (NUM_EXPERTS // NUM_NODES)
        assert np.all(node_of[real] == np.repeat(token_nodes[:, None], options["k"], 1)[real])


def test_all_nodes_equals_topk(backend):
    logits = edge_case_logits(1, 16, NUM_EXPERTS, seed=2)[0]
    local = mr.policies.LocalityTopK(num_experts=NUM_EXPERTS, k=2, num_nodes=2, max_nodes=2)
    got = local(backend.asarray(logits), backend.asarray(nodes(16) % 2))
    assert_routing_equal(got, mr.TopK(num_experts=NUM_EXPERTS, k=2)(backend.asarray(logits)))


AFFINITY_CASES = [
    # Affinities rank the tokens inside each expert; cf < 1 forces drops.
    pytest.param(0.5, True, id="affinity"),
    # No affinities: router probabilities rank (= TopK k=1 with probs priority).
    pytest.param(0.5, False, id="probs"),
    # Capacity large enough for everyone.
    pytest.param(8.0, True, id="no-drops"),
]


@pytest.mark.parametrize(("capacity_factor", "with_affinity"), AFFINITY_CASES)
def test_affinity_routing(backend, capacity_factor, with_affinity):
    logits = edge_case_logits(2, 12, NUM_EXPERTS, seed=3)
    rng = np.random.default_rng(3)
    affinity = rng.uniform(-1, 1, size=logits.shape).astype(np.float32) if with_affinity else None
    router = mr.policies.AffinityRouting(num_experts=NUM_EXPERTS, capacity_factor=capacity_factor)
    routing = router(
        backend.asarray(logits), None if affinity is None else backend.asarray(affinity)
    )
    want = reference_affinity_routing(logits, affinity, capacity_factor=capacity_factor)
    assert_routing_equal(routing, want)


def test_affinity_without_scores_is_topk_probs(backend):
    logits = edge_case_logits(1, 16, NUM_EXPERTS, seed=4)[0]
    got = mr.policies.AffinityRouting(num_experts=NUM_EXPERTS, capacity_factor=0.5)(
        backend.asarray(logits)
    )
    topk = mr.TopK(
        num_experts=NUM_EXPERTS, k=1, normalize=False, capacity_factor=0.5, drop_policy="probs"
    )
    assert_routing_equal(got, topk(backend.asarray(logits)))


def test_affinity_scores_and_grap(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    x[0] = 0.0  # a zero token: affinity 0, not NaN
    gate = rng.standard_normal((NUM_EXPERTS, 16)).astype(np.float32)
    got = mr.policies.affinity_scores(backend.asarray(x), backend.asarray(gate))
    assert_close(got, reference_affinity_scores(x, gate), "affinity", rtol=1e-5, atol=1e-6)
    pooled = mr.policies.grouped_average_pooling(backend.asarray(x), NUM_EXPERTS)
    want = reference_grouped_average_pooling(x, NUM_EXPERTS)
    assert_close(pooled, want, "GrAP", rtol=1e-6, atol=1e-6)


def test_locality_loss(backend):
    logits = edge_case_logits(1, 16, NUM_EXPERTS, seed=6)[0]
    token_nodes = nodes(16, seed=6)
    routing = mr.TopK(num_experts=NUM_EXPERTS, k=2)(backend.asarray(logits))
    got = mr.policies.locality_loss(routing, backend.asarray(token_nodes), num_nodes=NUM_NODES)
    want = reference_locality_loss(routing.probs, routing.finite_rows, token_nodes, NUM_NODES)
    assert_close(got, want, "locality loss", rtol=1e-5)


def test_locality_topk_under_jit():
    jax = pytest.importorskip("jax")
    router = mr.policies.LocalityTopK(num_experts=NUM_EXPERTS, k=2, num_nodes=NUM_NODES)
    logits = edge_case_logits(1, 12, NUM_EXPERTS, seed=7)[0]
    token_nodes = nodes(12, seed=7)
    jitted = jax.jit(lambda values, where: router(values, where).expert_ids)
    got = jitted(jax.numpy.asarray(logits), jax.numpy.asarray(token_nodes))
    want = reference_locality_topk(logits, token_nodes, k=2, num_nodes=NUM_NODES)["expert_ids"]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mr.policies.LocalityTopK(num_experts=6, k=1, num_nodes=4), "num_nodes"),
        (lambda: mr.policies.LocalityTopK(num_experts=8, k=3, num_nodes=4), "k must be"),
        (lambda: mr.policies.LocalityTopK(8, 1, 4, max_nodes=5), "max_nodes"),
        (
            lambda: mr.policies.LocalityTopK(8, 1, 4)(np.zeros((3, 8)), np.zeros(2, np.int32)),
            "token_nodes",
        ),
        (
            lambda: mr.policies.LocalityTopK(8, 1, 4)(np.zeros((2, 8)), np.zeros(2)),
            "token_nodes",
        ),
        (lambda: mr.policies.AffinityRouting(num_experts=4, capacity_factor=0.0), "capacity"),
        (
            lambda: mr.policies.AffinityRouting(4, 1.0)(np.zeros((2, 4)), np.zeros((3, 4))),
            "affinity",
        ),
        (lambda: mr.policies.grouped_average_pooling(np.zeros((2, 6)), 4), "multiple"),
        (lambda: mr.policies.affinity_scores(np.zeros((2, 3)), np.zeros((4, 2))), "features"),
    ],
)
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_affinity_routing_under_jit():
    jax = pytest.importorskip("jax")
    router = mr.policies.AffinityRouting(num_experts=NUM_EXPERTS, capacity_factor=0.5)
    logits = edge_case_logits(1, 12, NUM_EXPERTS, seed=8)[0]
    affinity = np.random.default_rng(8).uniform(-1, 1, logits.shape).astype(np.float32)
    jitted = jax.jit(lambda values, scores: router(values, scores).expert_ids)
    got = jitted(jax.numpy.asarray(logits), jax.numpy.asarray(affinity))
    want = reference_affinity_routing(logits, affinity, capacity_factor=0.5)["expert_ids"]
    np.testing.assert_array_equal(np.asarray(got), want)
