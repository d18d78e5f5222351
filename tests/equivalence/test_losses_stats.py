"""Balancing losses, z-loss and routing statistics on every backend against float64 references."""

from __future__ import annotations

import pytest

import moerouter as mr
from moerouter.testing import (
    assert_close,
    edge_case_logits,
    reference_load_balancing,
    reference_null_load_balancing,
    reference_summary,
    reference_z_loss,
)

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
