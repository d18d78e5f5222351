"""MC-SMoE (moerouter.merging) on every backend against the float64 references.

The end-to-end case has a known answer: experts that are neuron-permuted copies of one expert
compute the same function, so aligning and merging them must give that expert back exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, edge_case_logits, to_numpy
from moerouter.testing.asserts import assert_equal
from moerouter.testing.reference.merging import (
    reference_expert_similarity,
    reference_group_experts,
    reference_merge_experts,
    reference_remap_expert_ids,
    reference_routing_statistics,
)

NUM_EXPERTS = 6


def _routings(backend, router, count, with_logits):
    batches = []
    for seed in range(2):
        logits = edge_case_logits(1, 12, NUM_EXPERTS, seed=seed)[0]
        routing = router(backend.asarray(logits))
        batches.append((routing, backend.asarray(logits) if with_logits else None))
    return batches


STATISTICS_CASES = [
    # Mixtral code: every real assignment counts; similarity from router logits.
    pytest.param("all", True, id="all-logits"),
    # Switch code: first choices only.
    pytest.param("top1", True, id="top1-logits"),
    # No logits handed over: probabilities stand in for the similarity.
    pytest.param("all", False, id="probs"),
]


@pytest.mark.parametrize(("count", "with_logits"), STATISTICS_CASES)
def test_collect_routing_statistics(backend, count, with_logits):
    router = mr.TopK(num_experts=NUM_EXPERTS, k=2)
    batches = _routings(backend, router, count, with_logits)
    state = None
    for routing, logits in batches:
        state = mr.merging.collect_routing_statistics(routing, logits, state=state, count=count)
    want = reference_routing_statistics(batches, NUM_EXPERTS, count=count)
    assert_equal(state.usage, want["usage"].astype(np.float32), "usage")
    assert_close(state.logit_gram, want["logit_gram"], "gram", rtol=1e-5, atol=1e-4)
    assert float(to_numpy(state.num_tokens)) == want["num_tokens"]
    frequencies = mr.merging.expert_frequencies(state)
    assert_close(frequencies, want["usage"] / want["usage"].sum(), "frequencies")
    similarity = mr.merging.expert_similarity(state)
    assert_close(
        similarity, reference_expert_similarity(want["logit_gram"]), "similarity", rtol=1e-5
    )


def test_statistics_expert_layout(backend):
    # Expert choice has no first choice; "all" counts every kept slot.
    logits = edge_case_logits(1, 12, NUM_EXPERTS, seed=3)[0]
    routing = mr.ExpertChoice(num_experts=NUM_EXPERTS, capacity_factor=1.0)(backend.asarray(logits))
    state = mr.merging.collect_routing_statistics(routing, backend.asarray(logits))
    want = reference_routing_statistics([(routing, logits)], NUM_EXPERTS)
    assert_equal(state.usage, want["usage"].astype(np.float32), "usage")
    with pytest.raises(ValueError, match="top1"):
        mr.merging.collect_routing_statistics(routing, count="top1")


GROUP_CASES = [
    # Two groups of six.
    pytest.param(2, 0, id="G2"),
    # Every expert its own group: the map is the usage rank.
    pytest.param(NUM_EXPERTS, 1, id="G-equals-E"),
    # One group: everything merges into the most used expert.
    pytest.param(1, 2, id="G1"),
]


@pytest.mark.parametrize(("num_groups", "seed"), GROUP_CASES)
def test_group_experts(backend, num_groups, seed):
    rng = np.random.default_rng(seed)
    frequencies = rng.dirichlet(np.ones(NUM_EXPERTS)).astype(np.float32)
    frequencies[4] = frequencies[1]  # a usage tie: the lower index ranks first
    similarity = rng.uniform(size=(NUM_EXPERTS, NUM_EXPERTS)).astype(np.float32)
    expert_map, dominant = mr.merging.group_experts(
        backend.asarray(frequencies), backend.asarray(similarity), num_groups
    )
    want_map, want_dominant = reference_group_experts(frequencies, similarity, num_groups)
    assert_equal(expert_map, want_map, "expert_map")
    assert_equal(dominant, want_dominant, "dominant")
    assert to_numpy(expert_map).dtype == np.int32


def test_num_groups_per_layer():
    frequencies = np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25] * 4])
    # Layer 2 not merged: counts every expert as 1, keeps all 4.
    assert mr.merging.num_groups_per_layer(frequencies, 2, merge_layers=[0, 1]) == [1, 3, 4]
    # average_num_groups == E: the authors lower the total by one so a threshold exists.
    assert mr.merging.num_groups_per_layer(np.array([[0.4, 0.3, 0.2, 0.1]]), 4) == [3]
    with pytest.raises(ValueError, match="average_num_groups"):
        mr.merging.num_groups_per_layer(np.full((1, 4), 0.25), 5)


def test_merge_experts(backend):
    rng = np.random.default_rng(5)
    weights = {
        "w_in": rng.standard_normal((NUM_EXPERTS, 5, 3)).astype(np.float32),
        "bias": rng.standard_normal((NUM_EXPERTS, 5)).astype(np.float32),
    }
    expert_map = np.array([0, 1, 0, 2, 1, 2], np.int32)
    frequencies = np.array([0.3, 0.1, 0.1, 0.0, 0.5, 0.0], np.float32)  # group 2 never used
    merged = mr.merging.merge_experts(
        {name: backend.asarray(value) for name, value in weights.items()},
        backend.asarray(expert_map),
        backend.asarray(frequencies),
        num_groups=3,
    )
    want = reference_merge_experts(weights, expert_map, frequencies, 3)
    for name in weights:
        assert_close(merged[name], want[name], name, rtol=1e-5, atol=1e-6)
        assert to_numpy(merged[name]).dtype == np.float32
    gate = rng.standard_normal((NUM_EXPERTS, 3)).astype(np.float32)
    mapping, usage = backend.asarray(expert_map), backend.asarray(frequencies)
    rows = mr.merging.merge_gate_rows(backend.asarray(gate), mapping, usage, num_groups=3)
    want_rows = reference_merge_experts({"g": gate}, expert_map, frequencies, 3)["g"]
    assert_close(rows, want_rows, "gate")


def test_remap_routing(backend):
    # NullExperts: null columns must follow the merged columns.
    logits = edge_case_logits(1, 12, NUM_EXPERTS + 2, seed=6)[0]
    routing = mr.NullExperts(num_experts=NUM_EXPERTS, num_null=2, k=3)(backend.asarray(logits))
    expert_map = np.array([1, 0, 1, 2, 0, 2], np.int32)
    merged = mr.merging.remap_routing(routing, backend.asarray(expert_map), num_groups=3)
    assert merged.num_experts == 3 and merged.num_choices == 5
    want_ids = reference_remap_expert_ids(routing.expert_ids, expert_map)
    assert_equal(merged.expert_ids, want_ids, "expert_ids")
    probs = to_numpy(routing.probs).astype(np.float64)
    want_probs = np.zeros((probs.shape[0], 5))
    for e, g in enumerate(expert_map):
        want_probs[:, g] += probs[:, e]
    want_probs[:, 3:] = probs[:, NUM_EXPERTS:]
    assert_close(merged.probs, want_probs, "probs")
    choice = to_numpy(routing.choice_ids)
    want_choice = np.where(choice < NUM_EXPERTS, expert_map[np.minimum(choice, 5)], choice - 3)
    assert_equal(merged.choice_ids, want_choice.astype(np.int32), "choice_ids")
    # The merged routing is a valid routing: plans build and invariants hold.
    from moerouter.testing import assert_plan_valid

    assert_plan_valid(mr.make_plan(merged), merged)


def test_low_rank_factors(backend):
    rng = np.random.default_rng(7)
    base = rng.standard_normal((2, 6, 2)) @ rng.standard_normal((2, 2, 5))  # rank 2 per expert
    weight = base.astype(np.float32)
    left, right = mr.merging.low_rank_factors(backend.asarray(weight), 2)
    assert tuple(left.shape) == (2, 6, 2) and tuple(right.shape) == (2, 2, 5)
    assert_close(to_numpy(left) @ to_numpy(right), weight, "rank-2 exact", rtol=1e-4, atol=1e-5)
    # Rank 1 is the best rank-1 approximation: the Eckart-Young error is the second singular value.
    left, right = mr.merging.low_rank_factors(backend.asarray(weight), 1)
    error = np.linalg.norm(weight - to_numpy(left) @ to_numpy(right), axis=(1, 2), ord=2)
    singular = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    assert_close(error, singular[:, 1], "spectral error", rtol=1e-4, atol=1e-5)


def _mlp(w_in, w_out, x):
    return np.maximum(x @ w_in.T, 0.0) @ w_out.T


def test_permuted_copies_merge_back_exactly(backend):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(8)
    d_model, d_ff = 4, 7
    base_in = rng.standard_normal((d_ff, d_model)).astype(np.float32)
    base_out = rng.standard_normal((d_model, d_ff)).astype(np.float32)
    other_in = rng.standard_normal((d_ff, d_model)).astype(np.float32)
    other_out = rng.standard_normal((d_model, d_ff)).astype(np.float32)
    w_in, w_out = [], []
    for e in range(4):  # experts 0, 1, 3: permuted copies of base; expert 2: unrelated
        perm = rng.permutation(d_ff) if e else np.arange(d_ff)
        source_in, source_out = (other_in, other_out) if e == 2 else (base_in, base_out)
        w_in.append(source_in[perm])
        w_out.append(source_out[:, perm])
    weights = {"w_in": backend.asarray(np.stack(w_in)), "w_out": backend.asarray(np.stack(w_out))}
    x = rng.standard_normal((5, d_model)).astype(np.float32)
    before = [_mlp(w_in[e], w_out[e], x) for e in range(4)]

    expert_map = backend.asarray(np.array([0, 0, 1, 0], np.int32))
    dominant = backend.asarray(np.array([0, 2], np.int32))
    aligned, permutations = mr.merging.align_experts(
        weights, expert_map, dominant, neuron_axis={"w_in": 0, "w_out": 1}
    )
    assert permutations.shape == (4, d_ff)
    for e in range(4):  # alignment preserves every expert's function
        after = _mlp(to_numpy(aligned["w_in"])[e], to_numpy(aligned["w_out"])[e], x)
        assert_close(after, before[e], f"expert {e}", rtol=1e-5, atol=1e-5)
    frequencies = backend.asarray(np.array([0.5, 0.2, 0.2, 0.1], np.float32))
    merged = mr.merging.merge_experts(aligned, expert_map, frequencies, num_groups=2)
    merged_in, merged_out = to_numpy(merged["w_in"]), to_numpy(merged["w_out"])
    assert_close(merged_in[0], base_in, "merged w_in", rtol=1e-6, atol=1e-6)
    assert_close(merged_out[0], base_out, "merged w_out", rtol=1e-6, atol=1e-6)
    assert_close(merged_in[1], w_in[2], "a group of one is unchanged", rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mr.merging.group_experts(np.ones(3), np.ones((3, 3)), 4), "num_groups"),
        (lambda: mr.merging.group_experts(np.ones(3), np.ones((2, 2)), 1), "similarity"),
        (
            lambda: mr.merging.merge_experts(
                {"w": np.ones((3, 2))}, np.zeros(3, np.int32), np.ones(2), num_groups=1
            ),
            "frequencies",
        ),
        (
            lambda: mr.merging.merge_experts(
                {"w": np.ones((2, 2))}, np.zeros(3, np.int32), np.ones(3), num_groups=1
            ),
            "weights",
        ),
        (lambda: mr.merging.low_rank_factors(np.ones((3, 2)), 3), "rank"),
        (
            lambda: mr.merging.align_experts(
                {"w": np.ones((2, 3, 3))},
                np.zeros(2, np.int32),
                np.zeros(1, np.int32),
                neuron_axis={},
            ),
            "neuron_axis",
        ),
        (lambda: mr.merging.collect_routing_statistics("routing"), "routing"),
    ],
)
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_missing_scipy_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match="SciPy"):
        mr.merging.weight_matching_permutation({"w": np.eye(2)}, {"w": np.eye(2)}, {"w": 0})
