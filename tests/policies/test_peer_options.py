"""Options that reproduce a peer's choice exactly: Megatron-Core's group score and capacity.

Megatron-Core (NVIDIA/Megatron-LM d98e8a64, ``megatron/core/transformer/moe/moe_utils.py``):

- ``group_limited_topk`` (lines 673-728) scores a group by the sum of its top
  ``topk // group_topk`` routing scores (lines 711-713), a generalisation of DeepSeek-V3's
  top-2 sum (``deepseek-ai/DeepSeek-V3`` ``inference/model.py::Gate.forward``, lines 584-592:
  ``topk(2)`` with a bias, ``amax`` without);
- ``get_capacity`` (lines 248-266) is ``ceil((num_tokens / num_experts) * capacity_factor)``
  (line 263) in Python floats, called with ``num_tokens = T * k`` by ``apply_router_token_dropping``
  (lines 1019-1085).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import Backend, to_numpy
from moerouter.testing.reference.token_choice import reference_deepseek


def megatron_group_limited_choice(selection, k, num_groups, group_topk):
    """Expert sets of group_limited_topk, from the float32 selection scores (score + bias)."""
    tokens, experts = selection.shape
    grouped = selection.reshape(tokens, num_groups, experts // num_groups)
    top = np.sort(grouped, axis=-1)[..., ::-1][..., : k // group_topk]
    group_scores = top.sum(-1, dtype=np.float32)
    kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :group_topk]
    mask = np.zeros((tokens, num_groups), bool)
    np.put_along_axis(mask, kept, True, axis=-1)
    masked = np.where(np.repeat(mask, experts // num_groups, axis=-1), selection, -np.inf)
    return [set(row) for row in np.argsort(-masked, axis=-1, kind="stable")[:, :k].tolist()]


def sigmoid32(logits):
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


E, GROUPS = 16, 4
LOGITS = np.random.default_rng(0).standard_normal((256, E)).astype(np.float32)
BIAS = np.random.default_rng(1).uniform(-0.1, 0.1, E).astype(np.float32)


def test_topk_sum_group_score_is_megatrons_group_limited_topk():
    # k = 6 over 2 of 4 groups: Megatron scores a group by its top 3; top2_sum differs.
    k, keep = 6, 2
    router = mr.DeepSeekTopK(E, k, num_groups=GROUPS, topk_groups=keep, group_score="topk_sum")
    routing = router(LOGITS, BIAS)
    selection = (sigmoid32(LOGITS) + BIAS).astype(np.float32)
    expected = megatron_group_limited_choice(selection, k, GROUPS, keep)
    actual = [set(row) for row in routing.expert_ids.reshape(-1, k).tolist()]
    assert actual == expected
    top2 = mr.DeepSeekTopK(E, k, num_groups=GROUPS, topk_groups=keep)(LOGITS, BIAS)
    assert not np.array_equal(top2.expert_ids, routing.expert_ids)  # the option matters here


def test_topk_sum_is_the_top2_sum_when_k_over_groups_is_two():
    # DeepSeek-V3's shape in small: k = 8 over 4 kept groups.
    options = {"num_groups": 8, "topk_groups": 4}
    logits = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    bias = np.random.default_rng(3).uniform(-0.1, 0.1, 32).astype(np.float32)
    top2 = mr.DeepSeekTopK(32, 8, **options)(logits, bias)
    topk_sum = mr.DeepSeekTopK(32, 8, group_score="topk_sum", **options)(logits, bias)
    np.testing.assert_array_equal(topk_sum.expert_ids, top2.expert_ids)
    np.testing.assert_array_equal(topk_sum.weights, top2.weights)


def test_topk_sum_follows_a_per_call_k():
    router = mr.DeepSeekTopK(E, 4, num_groups=GROUPS, topk_groups=2, group_score="topk_sum")
    selection = (sigmoid32(LOGITS) + BIAS).astype(np.float32)
    routing = router(LOGITS, BIAS, k=6)
    expected = megatron_group_limited_choice(selection, 6, GROUPS, 2)
    assert [set(row) for row in routing.expert_ids.reshape(-1, 6).tolist()] == expected


@pytest.mark.parametrize("backend", list(Backend), ids=str)
def test_topk_sum_matches_the_reference_on_every_backend(backend):
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    options = {"num_groups": GROUPS, "topk_groups": 2, "group_score": "topk_sum"}
    routing = mr.DeepSeekTopK(E, 6, **options)(backend.asarray(LOGITS), backend.asarray(BIAS))
    expected = reference_deepseek(LOGITS, 6, BIAS, **options)
    np.testing.assert_array_equal(to_numpy(routing.expert_ids), expected["expert_ids"])
    np.testing.assert_allclose(to_numpy(routing.weights), expected["weights"], rtol=2e-6)


def test_topk_sum_needs_k_at_least_topk_groups():
    with pytest.raises(ValueError, match="topk_groups"):
        mr.DeepSeekTopK(E, 1, num_groups=GROUPS, topk_groups=2, group_score="topk_sum")
    router = mr.DeepSeekTopK(E, 4, num_groups=GROUPS, topk_groups=2, group_score="topk_sum")
    with pytest.raises(ValueError, match="k must be >= topk_groups"):
        router(LOGITS, k=1)
    with pytest.raises(ValueError, match="group_score"):
        mr.DeepSeekTopK(E, 2, num_groups=GROUPS, group_score="top3_sum")


def megatron_get_capacity(num_tokens, num_experts, capacity_factor):
    """get_capacity without min_capacity (apply_router_token_dropping passes none)."""
    return math.ceil((num_tokens / num_experts) * capacity_factor)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: mr.TopK(3, 1, **kw),
        lambda **kw: mr.DeepSeekTopK(3, 1, **kw),
    ],
    ids=["topk", "deepseek"],
)
def test_megatron_capacity_rounding_of_the_issue(make):
    # get_capacity(50, 3, 0.9): (50 / 3) * 0.9 is 15.000000000000002 in floats, so 16.
    logits = np.random.default_rng(4).standard_normal((50, 3)).astype(np.float32)
    exact = make(capacity_factor=0.9)(logits)
    megatron = make(capacity_factor=0.9, capacity_rounding="megatron")(logits)
    assert (exact.capacity, megatron.capacity) == (15, 16)
    assert megatron.capacity == megatron_get_capacity(50 * 1, 3, 0.9)


def test_megatron_capacity_rounding_matches_get_capacity_everywhere():
    differing = 0
    for tokens in (1, 7, 50, 96, 1000):
        for experts in (3, 7, 8, 64):
            for k in (1, 2, 3):
                if k > experts:
                    continue
                for factor in (0.1, 0.3, 0.7, 0.9, 1.0, 1.1, 1.25, 2.0, 3.3):
                    logits = np.zeros((tokens, experts), np.float32)
                    options = {"capacity_factor": factor, "min_capacity": 0}
                    routing = mr.TopK(experts, k, capacity_rounding="megatron", **options)(logits)
                    expected = megatron_get_capacity(tokens * k, experts, factor)
                    assert routing.capacity == max(expected, 1), (tokens, experts, k, factor)
                    exact = mr.TopK(experts, k, **options)(logits).capacity
                    differing += exact != routing.capacity
    assert differing > 0  # the float noise is real, not hypothetical


def test_bad_capacity_rounding_names_the_parameter():
    with pytest.raises(ValueError, match="capacity_rounding"):
        mr.TopK(4, 1, capacity_factor=1.0, capacity_rounding="floor")
    with pytest.raises(ValueError, match="capacity_rounding"):
        mr.DeepSeekTopK(4, 1, capacity_rounding="round")
