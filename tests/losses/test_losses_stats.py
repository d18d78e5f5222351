"""Balancing losses, z-loss and routing statistics on every backend against float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import (
    assert_close,
    edge_case_logits,
    reference_co_occurrence,
    reference_concatenated_load_balancing,
    reference_entropy,
    reference_importance_loss,
    reference_load_balancing,
    reference_load_loss,
    reference_null_load_balancing,
    reference_processed_by_at_least,
    reference_sequence_load_balancing,
    reference_summary,
    reference_z_loss,
    to_numpy,
)
from moerouter.testing.asserts import assert_equal

# A loss sums about T + E' float32 terms: at most (T + E') * 2**-24 relative error, under 2**-17
# for these shapes (T <= 32, E' <= 12); 2**-15 leaves the flash-attention factor and headroom.
LOSS_RTOL = 2.0**-15

ROUTERS = [
    # Token choice with drops: f counts choices before capacity, stats count drops.
    pytest.param(lambda: mr.TopK(num_experts=8, k=2, capacity_factor=0.75), 8, id="topk-capacity"),
    # Null columns: pooled and per-expert null losses differ; null_fraction is nonzero.
    pytest.param(lambda: mr.NullExperts(num_experts=4, num_null=4, k=2), 8, id="null-experts"),
    # Expert layout: every expert full, histogram up to E experts per token.
    pytest.param(
        lambda: mr.ExpertChoice(num_experts=8, capacity_factor=1.5), 8, id="expert-choice"
    ),
]
CONVENTIONS = ["megatron", "mixtral", "gshard"]


@pytest.mark.parametrize(("make_router", "num_columns"), ROUTERS)
def test_losses(backend, make_router, num_columns):
    logits = edge_case_logits(2, 16, num_columns, seed=11)
    routing = make_router()(backend.asarray(logits))
    for convention in CONVENTIONS:
        loss = mr.losses.load_balancing(routing, convention=convention)
        assert str(loss.dtype).endswith("float32") and loss.shape == ()
        expected = reference_load_balancing(routing, convention)
        assert_close(loss, expected, f"load_balancing[{convention}]", rtol=LOSS_RTOL)
        for null_mode in ("pooled", "per_expert"):
            loss = mr.losses.null_load_balancing(
                routing, null_mode=null_mode, convention=convention
            )
            expected = reference_null_load_balancing(routing, null_mode, convention)
            assert_close(
                loss, expected, f"null_load_balancing[{null_mode}, {convention}]", rtol=LOSS_RTOL
            )


@pytest.mark.parametrize(
    "shape",
    [
        # (T, E'): the usual case, with NaN, +inf and all -inf rows left out of the mean.
        pytest.param((1, 32, 8), id="2d"),
        # (G, S, E'): groups are flattened into tokens.
        pytest.param((2, 16, 8), id="groups"),
    ],
)
def test_z_loss(backend, shape):
    logits = edge_case_logits(*shape, seed=12, scale=4.0)
    if shape[0] == 1:
        logits = logits[0]
    loss = mr.losses.z_loss(backend.asarray(logits))
    assert_close(loss, reference_z_loss(logits), "z_loss", rtol=LOSS_RTOL)


@pytest.mark.parametrize(("make_router", "num_columns"), ROUTERS)
def test_summary(backend, make_router, num_columns):
    logits = edge_case_logits(2, 16, num_columns, seed=13)
    routing = make_router()(backend.asarray(logits))
    summary = mr.stats.summary(routing)
    expected = reference_summary(routing)
    assert set(summary) == set(expected)
    for name, value in summary.items():
        assert_close(value, expected[name], name, rtol=LOSS_RTOL)
    assert int(expected["nonfinite_rows"]) == 3  # NaN, +inf and all -inf rows


# --------------------------------------------------------------------------------------------
# Padding masks, the losses of Shazeer, DeepSeek and the entropy, and the new statistics.
# --------------------------------------------------------------------------------------------

MASK = np.random.default_rng(21).random((2, 16)) < 0.7

MASKS = [
    # No mask: only non-finite rows are left out.
    pytest.param(None, id="no-mask"),
    # (G, S) mask: random padding inside every group, on top of the non-finite rows.
    pytest.param(MASK, id="mask-GS"),
    # (T,) mask, the same tokens flattened: must give the same numbers as (G, S).
    pytest.param(MASK.reshape(-1), id="mask-T"),
    # A whole group of padding: group-wise losses average over the other group only.
    pytest.param(np.concatenate([np.zeros((1, 16), bool), MASK[1:]]), id="mask-empty-group"),
]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize(("make_router", "num_columns"), ROUTERS)
def test_masked_losses(backend, make_router, num_columns, mask):
    logits = edge_case_logits(2, 16, num_columns, seed=22)
    routing = make_router()(backend.asarray(logits))
    device_mask = None if mask is None else backend.asarray(mask)
    for convention in CONVENTIONS:
        loss = mr.losses.load_balancing(routing, convention=convention, mask=device_mask)
        expected = reference_load_balancing(routing, convention, mask)
        assert_close(loss, expected, f"load_balancing[{convention}]", rtol=LOSS_RTOL)
        loss = mr.losses.null_load_balancing(routing, convention=convention, mask=device_mask)
        expected = reference_null_load_balancing(routing, "pooled", convention, mask)
        assert_close(loss, expected, f"null_load_balancing[{convention}]", rtol=LOSS_RTOL)
    loss = mr.losses.z_loss(backend.asarray(logits), mask=device_mask)
    assert_close(loss, reference_z_loss(logits, mask), "z_loss", rtol=LOSS_RTOL)
    for source in ("weights", "probs"):
        loss = mr.losses.importance_loss(routing, source=source, mask=device_mask)
        expected = reference_importance_loss(routing, source, mask)
        # CV² divides by the squared mean: relative error doubles; absolute floor for ~0 values.
        assert_close(loss, expected, f"importance_loss[{source}]", rtol=4 * LOSS_RTOL, atol=1e-6)
    loss = mr.losses.entropy(routing, mask=device_mask)
    assert_close(loss, reference_entropy(routing, mask), "entropy", rtol=LOSS_RTOL)
    if routing.layout == "token":
        loss = mr.losses.sequence_load_balancing(routing, alpha=0.5, mask=device_mask)
        expected = reference_sequence_load_balancing(routing, 0.5, mask)
        assert_close(loss, expected, "sequence_load_balancing", rtol=LOSS_RTOL)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize(("make_router", "num_columns"), ROUTERS)
def test_new_stats(backend, make_router, num_columns, mask):
    logits = edge_case_logits(2, 16, num_columns, seed=23)
    routing = make_router()(backend.asarray(logits))
    device_mask = None if mask is None else backend.asarray(mask)
    counts = mr.stats.co_occurrence(routing, mask=device_mask)
    assert str(counts.dtype).endswith("int32")
    assert_equal(counts, reference_co_occurrence(routing, mask), "co_occurrence")
    ratios = mr.stats.processed_by_at_least(routing, mask=device_mask)
    expected = reference_processed_by_at_least(routing, None, mask)
    assert_close(ratios, expected, "processed_by_at_least", rtol=LOSS_RTOL)
    # A V-MoE style threshold list picks entries of the full vector.
    thresholds = [1, 2] if routing.fan_in >= 2 else [1]
    picked = mr.stats.processed_by_at_least(routing, thresholds=thresholds, mask=device_mask)
    assert_close(picked, expected[thresholds], "processed_by_at_least[list]", rtol=LOSS_RTOL)


LOAD_LOSS_CASES = [
    # Shazeer: per-(token, expert) noise std, (k+1)-th / k-th threshold.
    pytest.param("shazeer", "array", 2, id="shazeer-array-std"),
    # V-MoE: one scalar std (1/E), k-th noisy logit as threshold for every expert.
    pytest.param("vmoe", "scalar", 2, id="vmoe-scalar-std"),
    # Shazeer with k = E - 1: the (k+1)-th value is the row's smallest.
    pytest.param("shazeer", "scalar", 7, id="shazeer-k-max"),
    # V-MoE with k = E: the threshold is the smallest noisy logit.
    pytest.param("vmoe", "array", 8, id="vmoe-k-equals-E"),
]


@pytest.mark.parametrize("mask", MASKS[:2])
@pytest.mark.parametrize(("threshold", "std_kind", "k"), LOAD_LOSS_CASES)
def test_load_loss(backend, threshold, std_kind, k, mask):
    rng = np.random.default_rng(24)
    logits = edge_case_logits(2, 16, 8, seed=24)
    if std_kind == "array":
        noise_std = (rng.random(logits.shape) + 0.05).astype(np.float32)
        noise_std[0, 0, :4] = 0.0  # zero std: the hard indicator
        device_std = backend.asarray(noise_std)
    else:
        noise_std = 1.0 / 8
        device_std = noise_std
    noisy = (logits + noise_std * rng.standard_normal(logits.shape)).astype(np.float32)
    device_mask = None if mask is None else backend.asarray(mask)
    loss = mr.losses.load_loss(
        backend.asarray(logits),
        backend.asarray(noisy),
        device_std,
        k=k,
        threshold=threshold,
        mask=device_mask,
    )
    expected = reference_load_loss(logits, noisy, noise_std, k, threshold, mask)
    # Each Φ carries up to ~1e-6 relative error (erfc fit and float32 arguments); CV² doubles it.
    assert_close(loss, expected, "load_loss", rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("convention", ["megatron", "mixtral"])
def test_state_equals_concatenated_batch(backend, convention):
    # Three micro-batches of different sizes, the second padded: the state's loss must be the
    # loss of the concatenated (unpadded) batch, both from the reference and from the library.
    router = mr.TopK(num_experts=6, k=2)
    rng = np.random.default_rng(25)
    sizes = (5, 9, 3)
    batches = [(2 * rng.standard_normal((size, 6))).astype(np.float32) for size in sizes]
    masks = [None, np.arange(9) < 6, None]
    state = mr.losses.balance_state_init(6, xp=backend.namespace())
    routings = []
    for logits, mask in zip(batches, masks, strict=True):
        routing = router(backend.asarray(logits))
        routings.append(routing)
        device_mask = None if mask is None else backend.asarray(mask)
        state = mr.losses.accumulate(state, routing, mask=device_mask)
    loss = mr.losses.load_balancing_from_state(state, convention=convention)
    expected = reference_concatenated_load_balancing(routings, convention, masks)
    assert_close(loss, expected, "load_balancing_from_state", rtol=LOSS_RTOL)
    unpadded = np.concatenate([batches[0], batches[1][:6], batches[2]])
    direct = mr.losses.load_balancing(router(backend.asarray(unpadded)), convention=convention)
    assert_close(loss, to_numpy(direct), "state vs concatenated batch", rtol=LOSS_RTOL)
    assert int(to_numpy(state.tokens)) == 14
    assert int(to_numpy(state.counts).sum()) == 28
