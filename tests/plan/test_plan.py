"""make_plan, dispatch and combine on every backend against the float64 loop references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import (
    assert_plan_equal,
    assert_plan_valid,
    edge_case_logits,
    reference_combine,
    reference_dispatch,
    reference_make_plan,
    to_numpy,
)

ROUTERS = [
    # Token layout with drops (-1 rows sort last) and groups.
    pytest.param(lambda: mr.TopK(num_experts=8, k=2, capacity_factor=0.75), 8, id="topk-capacity"),
    # Null choices are -1 rows; tokens reaching no real expert combine to zero.
    pytest.param(lambda: mr.NullExperts(num_experts=4, num_null=4, k=2), 8, id="null-experts"),
    # Expert layout: combine_rows gathers a variable number of experts per token.
    pytest.param(
        lambda: mr.ExpertChoice(num_experts=8, capacity_factor=1.5), 8, id="expert-choice"
    ),
    # Expert layout with C = S: non-finite rows are taken as expert -1.
    pytest.param(lambda: mr.ExpertChoice(num_experts=8, capacity_factor=20.0), 8, id="ec-full"),
]

FEATURES = 5


def combine_bound(ye: np.ndarray, plan: dict, output_dtype: str) -> np.ndarray:
    """How far a float32 fixed-order combine may stray from the float64 reference, per entry.

    Summing F products in float32 costs at most (F + 1) roundings of u = 2**-24 on the sum of
    magnitudes; a half-precision output adds one rounding of its own on |y|. Doubled (the
    flash-attention rule) for headroom.
    """
    rows, weights = plan["combine_rows"], np.abs(plan["combine_weights"])
    magnitude = np.zeros((rows.shape[0], ye.shape[1]))
    for f in range(rows.shape[1]):
        present = rows[:, f] >= 0
        magnitude[present] += weights[present, f, None] * np.abs(ye[rows[present, f]])
    unit = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}[output_dtype]
    return 2 * ((rows.shape[1] + 1) * 2.0**-24 * magnitude + unit * magnitude) + 1e-30


@pytest.mark.parametrize(("make_router", "num_columns"), ROUTERS)
def test_plan_dispatch_combine(backend, make_router, num_columns):
    logits = edge_case_logits(2, 16, num_columns, seed=7)
    routing = make_router()(backend.asarray(logits))
    plan = mr.make_plan(routing)
    reference = reference_make_plan(routing)
    assert_plan_valid(plan, routing)
    assert_plan_equal(plan, reference, rtol=0.0, atol=0.0)  # weights are copied, not computed

    rng = np.random.default_rng(8)
    x = rng.standard_normal((routing.num_tokens, FEATURES)).astype(np.float32)
    xe = mr.dispatch(backend.asarray(x), plan)
    np.testing.assert_array_equal(to_numpy(xe), reference_dispatch(x, reference))

    ye = rng.standard_normal((plan.num_rows, FEATURES)).astype(np.float32)
    # Rows past num_valid belong to no expert: garbage there must not leak into the output.
    ye[int(to_numpy(plan.num_valid)) :] = np.nan
    y = mr.combine(backend.asarray(ye), plan)
    assert to_numpy(y).dtype == np.float32
    expected = reference_combine(ye, reference)
    assert_within(y, expected, combine_bound(ye, reference, "float32"))


def assert_within(actual, expected: np.ndarray, bound: np.ndarray) -> None:
    error = np.abs(to_numpy(actual).astype(np.float64) - expected)
    bad = ~(error <= bound)
    assert not np.any(bad), (
        f"combine strays {error.max():.3g} from the reference; first at {np.argwhere(bad)[0]}"
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dispatch_combine_half_precision(backend, dtype):
    # Half activations: dispatch copies exactly, combine accumulates in float32 and rounds once.
    if (dtype == "bfloat16" and not backend.has_bfloat16) or (
        dtype == "float16" and not backend.has_float16
    ):
        pytest.skip(f"{backend} has no {dtype}")
    logits = edge_case_logits(2, 16, 8, seed=9)
    routing = mr.TopK(num_experts=8, k=2)(backend.asarray(logits))
    plan = mr.make_plan(routing)
    reference = reference_make_plan(routing)
    rng = np.random.default_rng(10)
    x = backend.asarray(rng.standard_normal((32, FEATURES)), dtype=dtype)
    xe = mr.dispatch(x, plan)
    assert str(xe.dtype).endswith(dtype)
    np.testing.assert_array_equal(to_numpy(xe), reference_dispatch(x, reference))

    ye = backend.asarray(rng.standard_normal((plan.num_rows, FEATURES)), dtype=dtype)
    y = mr.combine(ye, plan)
    assert str(y.dtype).endswith(dtype)
    expected = reference_combine(ye, reference)
    assert_within(y, expected, combine_bound(to_numpy(ye).astype(np.float64), reference, dtype))
