"""Every policy on every backend against the float64 loop references.

Routing decisions (token, expert and choice ids, finite rows) must be identical; weights and
probabilities agree within the tolerance derived in :mod:`moerouter.testing.asserts`. Inputs come
from :func:`~moerouter.testing.reference.edge_case_logits`: random rows plus -inf entries, NaN,
+inf and all -inf rows, and exact ties inside a row and between tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import (
    assert_routing_equal,
    edge_case_logits,
    reference_expert_choice,
    reference_null_experts,
    reference_sinkhorn_expert_choice,
    reference_sparsity_constrained_expert_choice,
    reference_topk,
)

NUM_EXPERTS = 8

WEIGHT_RULES = [
    # Mixtral / Qwen norm_topk_prob: renormalised softmax, computed as a softmax of the k logits.
    pytest.param("softmax", True, False, id="softmax-normalize"),
    # Switch / GShard: raw softmax probabilities.
    pytest.param("softmax", False, False, id="softmax-raw"),
    # softmax_after_topk wins over normalize=False: must still be the k-logit softmax.
    pytest.param("softmax", False, True, id="softmax-raw-after-topk"),
    # Both flags: the same numbers as softmax-normalize, through a different branch.
    pytest.param("softmax", True, True, id="softmax-normalize-after-topk"),
    # DeepSeek-V3: sigmoid scores renormalised over the k chosen.
    pytest.param("sigmoid", True, False, id="sigmoid-normalize"),
    # Raw sigmoid scores: weights need not sum to 1.
    pytest.param("sigmoid", False, False, id="sigmoid-raw"),
    # Sigmoid selection, softmax weights over the selected logits.
    pytest.param("sigmoid", False, True, id="sigmoid-after-topk"),
    # softmax_after_topk with normalize: the renormalise branch must not run on top of it.
    pytest.param("sigmoid", True, True, id="sigmoid-normalize-after-topk"),
]

CAPACITY = [
    # No capacity: nothing dropped.
    pytest.param(None, "position", id="no-capacity"),
    # cf < 1 forces drops; k-major, then token order.
    pytest.param(0.75, "position", id="capacity-position"),
    # Same drops decided by descending probability; duplicated rows tie, broken by position.
    pytest.param(0.75, "probs", id="capacity-probs"),
]


@pytest.mark.parametrize(("score", "normalize", "softmax_after_topk"), WEIGHT_RULES)
@pytest.mark.parametrize(("capacity_factor", "drop_policy"), CAPACITY)
def test_topk_grouped(backend, score, normalize, softmax_after_topk, capacity_factor, drop_policy):
    # (G, S, E) logits: capacity is per group, token ids run over groups.
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=1)
    options = {
        "score": score,
        "normalize": normalize,
        "softmax_after_topk": softmax_after_topk,
        "capacity_factor": capacity_factor,
        "drop_policy": drop_policy,
    }
    routing = mr.TopK(num_experts=NUM_EXPERTS, k=2, **options)(backend.asarray(logits))
    assert_routing_equal(routing, reference_topk(logits, 2, **options))


TOPK_2D = [
    # Switch: k=1; with normalize every weight would be 1, so raw probabilities.
    pytest.param({"k": 1, "normalize": False}, id="switch-k1"),
    # k = E: every column chosen, -inf ones included as expert -1.
    pytest.param({"k": NUM_EXPERTS}, id="k-equals-E"),
    # vmoe rounds capacity up to a multiple of 4; 1.1 * S * k / E must not gain a row from noise.
    pytest.param(
        {"k": 2, "capacity_factor": 1.1, "capacity_multiple_of": 4}, id="capacity-multiple-of-4"
    ),
    # Tiny capacity: most second choices and many first choices dropped.
    pytest.param({"k": 3, "capacity_factor": 0.1, "drop_policy": "probs"}, id="capacity-tiny"),
    # Capacity so large nothing can be dropped: must equal no capacity.
    pytest.param({"k": 2, "capacity_factor": 100.0}, id="capacity-huge"),
]


@pytest.mark.parametrize("options", TOPK_2D)
def test_topk_2d(backend, options):
    logits = edge_case_logits(1, 32, NUM_EXPERTS, seed=2)[0]
    routing = mr.TopK(num_experts=NUM_EXPERTS, **options)(backend.asarray(logits))
    k = options["k"]
    reference = reference_topk(logits, k, **{n: v for n, v in options.items() if n != "k"})
    assert_routing_equal(routing, reference)


NULL_CASES = [
    # The AdaMoE Mixtral shape, scaled down: m = E, k' = 2k.
    pytest.param({"num_experts": 4, "num_null": 4, "k": 4}, (1, 24), id="adamoe"),
    # k larger than E: some tokens must route to nulls.
    pytest.param({"num_experts": 3, "num_null": 5, "k": 5}, (1, 18), id="k-above-E"),
    # Capacity counts real experts only; k-major position priority.
    pytest.param(
        {"num_experts": 4, "num_null": 2, "k": 3, "capacity_factor": 0.5},
        (2, 12),
        id="capacity-position-groups",
    ),
    # Capacity with probability priority.
    pytest.param(
        {"num_experts": 4, "num_null": 2, "k": 3, "capacity_factor": 0.5, "drop_policy": "probs"},
        (2, 12),
        id="capacity-probs-groups",
    ),
]


@pytest.mark.parametrize(("options", "groups"), NULL_CASES)
def test_null_experts(backend, options, groups):
    num_columns = options["num_experts"] + options["num_null"]
    logits = edge_case_logits(*groups, num_columns, seed=3)
    routing = mr.NullExperts(**options)(backend.asarray(logits))
    assert_routing_equal(routing, reference_null_experts(logits, **options))


def test_null_experts_without_nulls_is_topk(backend):
    # AdaMoE invariant (i): m = 0 and the same k is Mixtral's renormalised top-k, exactly.
    logits = backend.asarray(edge_case_logits(2, 16, 8, seed=4))
    null = mr.NullExperts(num_experts=8, num_null=0, k=2, capacity_factor=0.8)(logits)
    topk = mr.TopK(num_experts=8, k=2, capacity_factor=0.8)(logits)
    assert_routing_equal(null, topk, rtol=0.0, atol=0.0)
    assert_routing_equal(null, reference_topk(logits, 2, capacity_factor=0.8))


EXPERT_CHOICE = [
    # The paper's main setting, EC-CF2.
    pytest.param(2.0, 1, (1, 24), id="cf2"),
    # C = ceil(S/E): every expert takes a few tokens, some tokens none.
    pytest.param(1.0, 1, (2, 16), id="cf1-groups"),
    # C rounded up to a multiple of 4.
    pytest.param(0.5, 4, (2, 16), id="multiple-of-4"),
    # C > S before the cap: every slot filled, so non-finite rows and -inf logits show as expert -1.
    pytest.param(50.0, 1, (2, 10), id="capacity-above-S"),
]


@pytest.mark.parametrize(("capacity_factor", "multiple_of", "groups"), EXPERT_CHOICE)
def test_expert_choice(backend, capacity_factor, multiple_of, groups):
    logits = edge_case_logits(*groups, NUM_EXPERTS, seed=5)
    if groups[0] == 1:
        logits = logits[0]
    router = mr.ExpertChoice(
        num_experts=NUM_EXPERTS,
        capacity_factor=capacity_factor,
        capacity_multiple_of=multiple_of,
    )
    routing = router(backend.asarray(logits))
    reference = reference_expert_choice(logits, capacity_factor, capacity_multiple_of=multiple_of)
    assert_routing_equal(routing, reference)


EXPERT_LAYOUT = [
    # Probabilities; cf = 3 asks every expert for 9 of 12 tokens, more than most have usable.
    pytest.param(
        lambda: mr.ExpertChoice(num_experts=4, capacity_factor=3.0),
        lambda logits: reference_expert_choice(logits, 3.0),
        id="expert-choice",
    ),
    # Sinkhorn potentials rank the tokens; the same selection code.
    pytest.param(
        lambda: mr.SinkhornExpertChoice(num_experts=4, capacity_factor=3.0),
        lambda logits: reference_sinkhorn_expert_choice(logits, 3.0),
        id="sinkhorn",
    ),
    # A sparse transport plan ranks them; again the same selection code.
    pytest.param(
        lambda: mr.SparsityConstrainedExpertChoice(num_experts=4, capacity_factor=3.0),
        lambda logits: reference_sparsity_constrained_expert_choice(logits, 3.0),
        id="sparse-transport",
    ),
]


@pytest.mark.parametrize(("make_router", "reference"), EXPERT_LAYOUT)
def test_expert_layout_with_neg_inf_masks(backend, make_router, reference):
    # Up to two of four logits per row -inf: experts run out of usable tokens, and the slots left
    # over must be expert -1 (never a -inf pair taken with weight 0), the same on every backend.
    # Two finite entries stay: rows with one would tie exactly in the transport rankings, where
    # float32 and float64 round the tie differently (the documented near-tie caveat).
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((2, 12, 4)).astype(np.float32)
    for row in logits.reshape(-1, 4):
        row[rng.permutation(4)[: rng.integers(0, 3)]] = -np.inf
    routing = make_router()(backend.asarray(logits))
    assert_routing_equal(routing, reference(logits))


HALF_POLICIES = [
    # Token choice with capacity.
    pytest.param(lambda: mr.TopK(num_experts=8, k=2, capacity_factor=0.9), id="topk"),
    # Null experts.
    pytest.param(lambda: mr.NullExperts(num_experts=4, num_null=4, k=2), id="null"),
    # Expert choice: ranks probabilities across tokens.
    pytest.param(lambda: mr.ExpertChoice(num_experts=8, capacity_factor=2.0), id="expert-choice"),
]
HALF_REFERENCES = {
    "TopK": lambda logits: reference_topk(logits, 2, capacity_factor=0.9),
    "NullExperts": lambda logits: reference_null_experts(logits, 4, 4, 2),
    "ExpertChoice": lambda logits: reference_expert_choice(logits, 2.0),
}


@pytest.mark.parametrize("make_router", HALF_POLICIES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits(backend, make_router, dtype):
    # Router math runs in float32 whatever the logits dtype: half logits route exactly as their
    # float32 values do, and the outputs are float32 and int32.
    if (dtype == "bfloat16" and not backend.has_bfloat16) or (
        dtype == "float16" and not backend.has_float16
    ):
        pytest.skip(f"{backend} has no {dtype}")
    logits = backend.asarray(edge_case_logits(2, 16, 8, seed=6), dtype=dtype)
    router = make_router()
    routing = router(logits)
    assert_routing_equal(routing, HALF_REFERENCES[type(router).__name__](logits))
