"""The float64 references themselves, on examples small enough to work out by hand.

Agreement between a kernel and a reference proves little if both are wrong the same way; these
cases pin the references to the contract independently of any implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moerouter.testing import (
    reference_combine,
    reference_dispatch,
    reference_expert_choice,
    reference_load_balancing,
    reference_make_plan,
    reference_null_experts,
    reference_null_load_balancing,
    reference_summary,
    reference_topk,
    reference_z_loss,
)
from moerouter.testing.reference.capacity import reference_capacity


def test_topk_ties_and_order():
    # Equal logits go to the lower expert; weights renormalise to 1/2 each.
    routing = reference_topk(np.asarray([[1.0, 3.0, 3.0, 0.0]]), 2)
    assert routing["expert_ids"].tolist() == [1, 2]
    assert routing["weights"].tolist() == [0.5, 0.5]


def test_topk_minus_inf_never_routed():
    # k = 2 but only one finite logit: the second slot is expert -1 with weight 0.
    routing = reference_topk(np.asarray([[0.0, -np.inf, -np.inf]]), 2, normalize=False)
    assert routing["expert_ids"].tolist() == [0, -1]
    assert routing["choice_ids"].tolist() == [0, 1]
    assert routing["weights"].tolist() == [1.0, 0.0]


def test_capacity_is_k_major_then_position():
    # E = 2, k = 2, S = 2, cf = 0.5: C = ceil(0.5 * 2 * 2 / 2) = 1. Both tokens' first choices are
    # served before any second choice: token 0 keeps expert 0, token 1 keeps expert 1, and both
    # second choices find their expert full.
    logits = np.asarray([[2.0, 1.0], [1.0, 2.0]])
    routing = reference_topk(logits, 2, capacity_factor=0.5)
    assert routing["expert_ids"].tolist() == [0, -1, 1, -1]
    assert routing["weights"][[1, 3]].tolist() == [0.0, 0.0]


def test_capacity_probs_policy_prefers_confident_tokens():
    # Three tokens want expert 0 with rising confidence; C = ceil(1 * 3 * 1 / 2) = 2.
    logits = np.asarray([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    by_position = reference_topk(logits, 1, capacity_factor=1.0)
    by_probs = reference_topk(logits, 1, capacity_factor=1.0, drop_policy="probs")
    assert by_position["expert_ids"].tolist() == [0, 0, -1]
    assert by_probs["expert_ids"].tolist() == [-1, 0, 0]


@pytest.mark.parametrize(
    ("factor", "tokens", "per_token", "experts", "multiple_of", "expected"),
    [
        # 1.1 * 50 is 55.000000000000007 in floats: still 55 rows.
        pytest.param(1.1, 50, 1, 1, 1, 55, id="float-noise"),
        # ceil(1.0 * 10 * 2 / 8) = 3, rounded up to 4.
        pytest.param(1.0, 10, 2, 8, 4, 4, id="multiple-of-4"),
        # A tiny factor still gives at least one multiple.
        pytest.param(0.01, 4, 1, 8, 2, 2, id="minimum"),
    ],
)
def test_capacity(factor, tokens, per_token, experts, multiple_of, expected):
    assert reference_capacity(factor, tokens, per_token, experts, multiple_of) == expected


def test_null_experts_docstring_example():
    # Token 0 picks real 0 and null 2: weight 1 on expert 0. Token 1 picks only nulls: nothing.
    logits = np.asarray([[5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    routing = reference_null_experts(logits, 2, 2, 2)
    assert routing["expert_ids"].tolist() == [0, -1, -1, -1]
    assert routing["choice_ids"].tolist() == [0, 2, 2, 3]
    assert routing["weights"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_expert_choice_example():
    # Expert 0 prefers tokens 0 then 1, expert 1 tokens 2 then 3; C = ceil(4 / 2) = 2.
    logits = np.asarray([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    routing = reference_expert_choice(logits, 1.0)
    assert routing["token_ids"].tolist() == [0, 1, 2, 3]
    assert routing["expert_ids"].tolist() == [0, 0, 1, 1]
    assert routing["slots"] == 2 and routing["layout"] == "expert"
    np.testing.assert_allclose(routing["weights"][0], 1 / (1 + math.exp(-2)))


def test_plan_dispatch_combine_example():
    # Token 0 -> experts (1, 0), token 1 -> (1, -1): expert 0's row first, then expert 1's two
    # rows in assignment order, then the unassigned slot.
    routing = {
        "token_ids": np.asarray([0, 0, 1, 1]),
        "expert_ids": np.asarray([1, 0, 1, -1]),
        "weights": np.asarray([0.75, 0.25, 1.0, 0.0]),
        "choice_ids": np.asarray([1, 0, 1, 2]),
        "probs": np.zeros((2, 3)),
        "finite_rows": np.asarray([True, True]),
        "num_tokens": 2,
        "num_experts": 2,
        "layout": "token",
        "slots": 2,
        "num_groups": 1,
    }
    plan = reference_make_plan(routing)
    assert plan["order"].tolist() == [1, 0, 2, 3]
    assert plan["inverse"].tolist() == [1, 0, 2, 3]
    assert plan["group_sizes"].tolist() == [1, 2]
    assert int(plan["num_valid"]) == 3
    assert plan["combine_rows"].tolist() == [[1, 0], [2, -1]]
    x = np.asarray([[1.0], [10.0]])
    assert reference_dispatch(x, plan)[:, 0].tolist() == [1.0, 1.0, 10.0, 0.0]
    ye = np.asarray([[1.0], [2.0], [4.0], [np.nan]])
    assert reference_combine(ye, plan)[:, 0].tolist() == [0.75 * 2 + 0.25 * 1, 4.0]


def test_losses_at_uniform_routing():
    # Every expert chosen equally often with uniform probabilities: megatron 1, mixtral k.
    logits = np.zeros((4, 4))
    routing = reference_topk(logits, 2)
    routing["choice_ids"] = np.asarray([0, 1, 2, 3, 0, 1, 2, 3])
    assert reference_load_balancing(routing, "megatron") == pytest.approx(1.0)
    assert reference_load_balancing(routing, "mixtral") == pytest.approx(2.0)
    assert reference_load_balancing(routing, "gshard") == pytest.approx(2.0)
    assert reference_z_loss(np.zeros((3, 2))) == pytest.approx(math.log(2) ** 2)


def test_pooled_null_loss():
    # 2 real + 2 null columns, uniform probabilities; null counts 3 and 1 pool to 2 and 2.
    routing = reference_null_experts(np.zeros((4, 4)), 2, 2, 2)
    routing["choice_ids"] = np.asarray([0, 2, 1, 2, 0, 3, 1, 2])
    # f = (2, 2, 2, 2) / 8 pooled, P = 1/4 each: 4 * 4 * (1/4 * 1/4) = 1.
    assert reference_null_load_balancing(routing, "pooled") == pytest.approx(1.0)
    # per_expert: f = (2, 2, 3, 1) / 8, still 1 because P is uniform.
    assert reference_null_load_balancing(routing, "per_expert") == pytest.approx(1.0)


def test_summary_example():
    logits = np.asarray([[0.0, 1.0, np.nan], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    summary = reference_summary(reference_topk(logits, 1, capacity_factor=0.5))
    # C = 1: token 1 keeps expert 0, token 2 keeps expert 2; token 0 is non-finite.
    assert summary["tokens_per_expert"].tolist() == [1, 0, 1]
    assert summary["nonfinite_rows"] == 1
    assert summary["dropped_fraction"] == 0.0
    assert summary["real_experts_histogram"].tolist() == [0, 2]
