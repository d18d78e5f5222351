"""MEMoE anchor routing (moerouter.policies.anchor) on every backend against the references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy
from moerouter.testing.reference.methods import reference_anchor_mean_logits
from moerouter.testing.reference.token_choice import reference_topk

NUM_EXPERTS = 6
NUM_ANCHORS = 4


def anchors(num_tokens, seed=0):
    ids = np.random.default_rng(seed).integers(-1, NUM_ANCHORS, size=num_tokens)
    ids[0] = ids[1] = 2  # at least one shared anchor
    return ids.astype(np.int32)


LOGIT_CASES = [
    # Random (T, E) rows: plain means.
    pytest.param((1, 16), 0, id="2d"),
    # (G, S, E) with the edge-case rows (NaN, +inf, -inf entries): anchors span the groups and
    # non-finite rows keep their own logits.
    pytest.param((2, 12), 1, id="grouped-edge-cases"),
]


@pytest.mark.parametrize(("groups", "seed"), LOGIT_CASES)
def test_anchor_mean_logits(backend, groups, seed):
    logits = edge_case_logits(*groups, NUM_EXPERTS, seed=seed)
    if groups[0] == 1:
        logits = logits[0]
    ids = anchors(groups[0] * groups[1], seed)
    got = mr.policies.anchor_mean_logits(
        backend.asarray(logits), backend.asarray(ids), num_anchors=NUM_ANCHORS
    )
    assert_close(got, reference_anchor_mean_logits(logits, ids), "mean logits")


POLICIES = [
    # Token choice.
    pytest.param(mr.TopK(num_experts=NUM_EXPERTS, k=2), id="topk"),
    # Sigmoid scores, raw weights.
    pytest.param(mr.TopK(num_experts=NUM_EXPERTS, k=2, score="sigmoid", normalize=False), id="sig"),
    # AdaMoE null experts: logits have E + m columns.
    pytest.param(mr.NullExperts(num_experts=NUM_EXPERTS, num_null=2, k=3), id="null"),
]


@pytest.mark.parametrize("policy", POLICIES)
def test_tokens_sharing_an_anchor_get_identical_experts(backend, policy):
    rng = np.random.default_rng(3)
    columns = policy.num_experts + getattr(policy, "num_null", 0)
    logits = rng.standard_normal((20, columns)).astype(np.float32)
    ids = anchors(20, seed=3)
    router = mr.policies.AnchorRouting(policy, num_anchors=NUM_ANCHORS)
    routing = router(backend.asarray(logits), backend.asarray(ids))
    k = routing.slots
    experts = to_numpy(routing.expert_ids).reshape(20, k)
    weights = to_numpy(routing.weights).reshape(20, k)
    for anchor in range(NUM_ANCHORS):
        members = np.flatnonzero(ids == anchor)
        for t in members[1:]:
            np.testing.assert_array_equal(experts[t], experts[members[0]])
            np.testing.assert_array_equal(weights[t], weights[members[0]])
    if isinstance(policy, mr.TopK):
        options = {"score": policy.score, "normalize": policy.normalize}
        want = reference_topk(reference_anchor_mean_logits(logits, ids), policy.k, **options)
        assert_routing_equal(routing, want)


def test_anchor_router_input(backend):
    rng = np.random.default_rng(4)
    tokens = rng.standard_normal((5, 3)).astype(np.float32)
    table = rng.standard_normal((NUM_ANCHORS, 2)).astype(np.float32)
    ids = np.array([0, 3, -1, 0, 1], np.int32)
    got = mr.policies.anchor_router_input(
        backend.asarray(tokens), backend.asarray(ids), backend.asarray(table)
    )
    want = np.concatenate([tokens, np.where(ids[:, None] >= 0, table[ids], 0.0)], axis=1)
    assert_close(got, want, "router input", rtol=0, atol=0)


def test_anchor_routing_under_jit():
    jax = pytest.importorskip("jax")
    router = mr.policies.AnchorRouting(mr.TopK(num_experts=NUM_EXPERTS, k=2), NUM_ANCHORS)
    logits = np.random.default_rng(5).standard_normal((8, NUM_EXPERTS)).astype(np.float32)
    ids = anchors(8, seed=5)
    jitted = jax.jit(lambda values, anchor_ids: router(values, anchor_ids).expert_ids)
    got = jitted(jax.numpy.asarray(logits), jax.numpy.asarray(ids))
    want = reference_topk(reference_anchor_mean_logits(logits, ids), 2)["expert_ids"]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mr.policies.AnchorRouting("topk", num_anchors=2), "policy"),
        (lambda: mr.policies.AnchorRouting(mr.TopK(num_experts=2, k=1), num_anchors=0), "anchors"),
        (
            lambda: mr.policies.anchor_mean_logits(
                np.zeros((3, 2)), np.zeros(2, np.int32), num_anchors=1
            ),
            "anchor_ids",
        ),
        (
            lambda: mr.policies.anchor_mean_logits(np.zeros((3, 2)), np.zeros(3), num_anchors=1),
            "anchor_ids",
        ),
        (
            lambda: mr.policies.anchor_router_input(
                np.zeros(3), np.zeros(3, np.int32), np.zeros((1, 2))
            ),
            "tokens",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
