"""Balancing losses against Megatron-Core's computation, rewritten in float64 NumPy.

Megatron-Core (NVIDIA/Megatron-LM d98e8a64, ``megatron/core/transformer/moe``):

- ``router.py::TopKRouter.routing`` (lines 804-833) computes every aux loss from
  ``moe_utils.py::compute_routing_scores_for_aux_loss`` (lines 960-1016): a plain ``topk`` of the
  (per-token normalised) scores, **without** the expert bias and the group limit the routing
  itself used;
- ``switch_load_balancing_loss_func`` (lines 63-150): ``sum(P_sum * tokens_per_expert) * E /
  (k * T * T)``;
- ``router.py::_apply_seq_aux_loss`` (lines 450-505) folds the batch into the expert axis, so
  ``get_tokens_per_expert_and_token_count`` (lines 269-288) divides every sequence by the mean
  valid length, and the sum over sequences by the batch size.

The functions below restate those formulas (not the code) on (G, S, E) logits.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import Backend, to_numpy
from moerouter.testing.reference.losses import (
    reference_load_balancing,
    reference_sequence_load_balancing,
)

E, K = 8, 4


def megatron_aux_scores(logits, valid, score):
    """(routing map, scores) of compute_routing_scores_for_aux_loss, padding zeroed."""
    x = logits.astype(np.float64)
    if score == "softmax":
        scores = np.exp(x - x.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-x))
        scores /= scores.sum(-1, keepdims=True) + 1e-20
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :K]
    routing_map = np.zeros_like(scores)
    np.put_along_axis(routing_map, top, 1.0, axis=-1)
    return routing_map * valid[..., None], scores * valid[..., None]


def megatron_aux_loss(logits, valid, score="sigmoid"):
    """switch_load_balancing_loss_func over every token of the batch (coefficient 1)."""
    routing_map, scores = megatron_aux_scores(logits, valid, score)
    tokens = valid.sum()
    per_expert = routing_map.reshape(-1, E).sum(0)
    return float((scores.reshape(-1, E).sum(0) * per_expert).sum() * E / (K * tokens * tokens))


def megatron_seq_aux_loss(logits, valid, score="sigmoid"):
    """_apply_seq_aux_loss: per-sequence counts and sums over the mean valid length."""
    routing_map, scores = megatron_aux_scores(logits, valid, score)
    sequences = logits.shape[0]
    mean_length = valid.sum() / sequences
    total = (scores.sum(1) * routing_map.sum(1)).sum()  # (G, E) products, summed
    return float(total * E / (K * mean_length * mean_length) / sequences)


def make_logits(seed=0, shape=(3, 3, E)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# A bias that moves the selection away from the plain top-k: the last experts look attractive.
BIAS = np.asarray([0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3], np.float32)
DEEPSEEK = mr.DeepSeekTopK(E, K, num_groups=2, topk_groups=1)


def test_issue_23_repro_biased_group_limited_routing_counts_the_plain_top_k():
    logits = make_logits()
    valid = np.ones(logits.shape[:2], bool)
    routing = DEEPSEEK(logits, BIAS)
    plain = mr.TopK(E, K, score="sigmoid")(logits)
    # The routing's own choices differ from the plain top-k (the case the issue is about) ...
    assert not np.array_equal(routing.choice_ids, plain.choice_ids)
    expected = megatron_aux_loss(logits, valid)
    # ... and the loss counts the plain top-k, as Megatron-Core does, and as TopK's routing gives.
    assert float(mr.losses.load_balancing(routing)) == pytest.approx(expected, rel=1e-5)
    assert float(mr.losses.load_balancing(plain)) == pytest.approx(expected, rel=1e-5)
    # count="choices" is the routing's actual load: a different number here.
    choices = float(mr.losses.load_balancing(routing, count="choices"))
    assert choices != pytest.approx(expected, rel=1e-3)
    assert choices == pytest.approx(reference_load_balancing(routing, count="choices"), rel=1e-5)


def test_sequence_loss_of_a_biased_routing_counts_the_plain_top_k():
    # DeepSeek-V3's sequence-wise loss counts TopK(s_t) of the unbiased scores.
    logits = make_logits(1, (4, 6, E))
    valid = np.ones(logits.shape[:2], bool)
    routing = DEEPSEEK(logits, BIAS)
    expected = megatron_seq_aux_loss(logits, valid)
    assert float(mr.losses.sequence_load_balancing(routing)) == pytest.approx(expected, rel=1e-5)
    assert float(
        mr.losses.sequence_load_balancing(routing, convention="megatron")
    ) == pytest.approx(expected, rel=1e-5)
    assert float(mr.losses.sequence_load_balancing(routing, count="choices")) != pytest.approx(
        expected, rel=1e-3
    )


def test_global_state_counts_the_plain_top_k():
    logits = make_logits(2, (12, E))
    valid = np.ones(logits.shape[:1], bool)
    routing = DEEPSEEK(logits, BIAS)
    state = mr.losses.accumulate(mr.losses.balance_state_init(E, xp=np), routing)
    expected = megatron_aux_loss(logits, valid)
    assert float(mr.losses.load_balancing_from_state(state)) == pytest.approx(expected, rel=1e-5)
    actual = mr.losses.accumulate(mr.losses.balance_state_init(E, xp=np), routing, count="choices")
    np.testing.assert_array_equal(
        actual.counts, np.bincount(routing.choice_ids, minlength=E).astype(np.int32)
    )


def test_counts_stay_the_routing_choices_for_stats():
    # The bias update needs the actual load (Megatron-Core's _apply_expert_bias counts the
    # routing map the tokens were sent with): stats keep counting the routing's choices.
    routing = DEEPSEEK(make_logits(), BIAS)
    load = to_numpy(mr.stats.summary(routing)["tokens_per_expert"])
    np.testing.assert_array_equal(load, np.bincount(routing.expert_ids, minlength=E))


# Three sequences of 6 tokens with 6, 4 and 1 valid tokens: uneven padding.
LENGTHS = (6, 4, 1)
PADDED_VALID = np.arange(6)[None, :] < np.asarray(LENGTHS)[:, None]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sequence_loss_megatron_convention_normalises_by_the_mean_valid_length(score):
    logits = make_logits(3, (3, 6, E))
    routing = mr.TopK(E, K, score=score)(logits)
    expected = megatron_seq_aux_loss(logits, PADDED_VALID, score)
    megatron = float(
        mr.losses.sequence_load_balancing(routing, mask=PADDED_VALID, convention="megatron")
    )
    assert megatron == pytest.approx(expected, rel=1e-5)
    assert megatron == pytest.approx(
        reference_sequence_load_balancing(routing, mask=PADDED_VALID, convention="megatron"),
        rel=1e-6,
    )
    # The default normalises each sequence by its own valid length: another number here,
    # the same one without padding.
    own = float(mr.losses.sequence_load_balancing(routing, mask=PADDED_VALID))
    assert own != pytest.approx(megatron, rel=1e-3)
    assert own == pytest.approx(
        reference_sequence_load_balancing(routing, mask=PADDED_VALID), rel=1e-6
    )
    unpadded = [
        float(mr.losses.sequence_load_balancing(routing, convention=convention))
        for convention in ("deepseek", "megatron")
    ]
    assert unpadded[0] == pytest.approx(unpadded[1], rel=1e-6)


def test_sequence_loss_megatron_convention_counts_an_all_padding_sequence():
    # Megatron divides by the batch size, empty sequences included.
    logits = make_logits(4, (3, 4, E))
    valid = np.asarray([[True] * 4, [True, True, False, False], [False] * 4])
    routing = mr.TopK(E, K, score="sigmoid")(logits)
    actual = mr.losses.sequence_load_balancing(routing, mask=valid, convention="megatron")
    assert float(actual) == pytest.approx(megatron_seq_aux_loss(logits, valid), rel=1e-5)
    nothing = np.zeros_like(valid)
    assert (
        float(mr.losses.sequence_load_balancing(routing, mask=nothing, convention="megatron"))
        == 0.0
    )


@pytest.mark.parametrize("backend", list(Backend), ids=str)
def test_count_and_convention_agree_across_backends(backend):
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    logits = make_logits(5, (3, 6, E))
    routing = DEEPSEEK(backend.asarray(logits), backend.asarray(BIAS))
    mask = backend.asarray(PADDED_VALID)
    for count in ("top_k", "choices"):
        loss = mr.losses.load_balancing(routing, count=count)
        assert float(to_numpy(loss)) == pytest.approx(
            reference_load_balancing(routing, count=count), rel=1e-5
        )
        for convention in ("deepseek", "megatron"):
            loss = mr.losses.sequence_load_balancing(
                routing, mask=mask, convention=convention, count=count
            )
            expected = reference_sequence_load_balancing(
                routing, mask=PADDED_VALID, convention=convention, count=count
            )
            assert float(to_numpy(loss)) == pytest.approx(expected, rel=1e-5)


def test_bad_count_and_convention_name_the_parameter():
    routing = DEEPSEEK(make_logits(), BIAS)
    with pytest.raises(ValueError, match="count"):
        mr.losses.load_balancing(routing, count="routed")
    with pytest.raises(ValueError, match="convention"):
        mr.losses.sequence_load_balancing(routing, convention="mixtral")


@pytest.mark.parametrize("backend", list(Backend), ids=str)
def test_top_k_count_of_a_top_k_routing_is_its_choices_even_where_scores_underflow(backend):
    # Softmax probabilities of logits 200 and 300 below the best are both 0 in float32 (and
    # denormals are 0 under XLA): the count must still follow the routing, which ranked the
    # logits, rather than give the tie to the lower column.
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    logits = np.asarray(
        [[-300.0, -200.0, 0.0, -250.0], [-90.0, -95.0, 0.0, -89.0], [0.0, 1.0, 2.0, 3.0]],
        np.float32,
    )
    xp = backend.namespace()
    for router in (mr.TopK(4, 3), mr.TopK(4, 3, score="sigmoid"), mr.NullExperts(2, 2, 3)):
        routing = router(backend.asarray(logits))
        state = mr.losses.accumulate(mr.losses.balance_state_init(4, xp=xp), routing)
        choices = np.bincount(to_numpy(routing.choice_ids), minlength=4)
        np.testing.assert_array_equal(to_numpy(state.counts), choices)
