"""The NumPy kernels return what the agnostic path returns, for every policy and layout."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moerouter as mr
from moerouter import _numpy_backend, _registry

INTEGER_FIELDS = ("group_sizes", "order", "inverse", "source_tokens", "num_valid", "combine_rows")


def logits_for(num_tokens, num_columns, *, seed=0, groups=None, ties=False, bad_rows=()):
    rng = np.random.default_rng(seed)
    shape = (num_tokens, num_columns) if groups is None else (groups, num_tokens, num_columns)
    if ties:  # few distinct values: many exact ties inside rows
        values = rng.integers(0, 3, size=shape).astype(np.float32)
    else:
        values = rng.standard_normal(shape).astype(np.float32)
    flat = values.reshape(-1, num_columns)
    for row, value in bad_rows:
        flat[row] = value
    return values


ROUTERS = [
    # Mixtral-style softmax top-2: token layout, every slot real.
    pytest.param(mr.TopK(num_experts=8, k=2), 8, id="topk-softmax"),
    # Sigmoid scores without renormalisation (DeepSeek-V3 style).
    pytest.param(mr.TopK(num_experts=16, k=4, score="sigmoid", normalize=False), 16, id="sigmoid"),
    # Capacity drops in position order: -1 slots inside the token layout.
    pytest.param(mr.TopK(num_experts=8, k=2, capacity_factor=0.5), 8, id="capacity-position"),
    # Capacity drops by probability.
    pytest.param(
        mr.TopK(num_experts=8, k=2, capacity_factor=0.7, drop_policy="probs"),
        8,
        id="capacity-probs",
    ),
    # Switch: k = 1.
    pytest.param(mr.TopK(num_experts=4, k=1, normalize=False), 4, id="switch-k1"),
    # AdaMoE null experts: a variable number of real slots per token.
    pytest.param(mr.NullExperts(num_experts=8, num_null=8, k=4), 16, id="null-experts"),
    # Expert choice: expert layout, fan-in up to E with -1 padding.
    pytest.param(mr.ExpertChoice(num_experts=8, capacity_factor=2.0), 8, id="expert-choice"),
    # Expert choice with a small capacity: many tokens taken by no expert.
    pytest.param(
        mr.ExpertChoice(num_experts=16, capacity_factor=0.5), 16, id="expert-choice-sparse"
    ),
    # More than 255 experts: the 16-bit radix sort instead of the 8-bit one.
    pytest.param(mr.TopK(num_experts=300, k=3), 300, id="topk-300-experts"),
]


def run_all(router, logits, x, ye):
    routing = router(logits)
    plan = mr.make_plan(routing)
    return plan, mr.dispatch(x, plan), mr.combine(ye, plan)


def assert_same_plan(fast, reference):
    for name in INTEGER_FIELDS:
        got, want = getattr(fast, name), getattr(reference, name)
        assert type(got) is type(want), name
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert fast.combine_weights.dtype == reference.combine_weights.dtype
    np.testing.assert_array_equal(fast.combine_weights, reference.combine_weights)
    assert (fast.num_tokens, fast.num_experts) == (reference.num_tokens, reference.num_experts)


def combine_tolerance(ye, plan, dtype, eps=None):
    """How far two float32 gather-reduces in different orders may drift apart, per token."""
    weights = np.abs(plan.combine_weights).astype(np.float64)
    rows = np.where(plan.combine_rows >= 0, plan.combine_rows, 0)
    magnitude = np.einsum("tf,tfd->td", weights, np.abs(ye.astype(np.float64))[rows])
    fan_in = plan.combine_rows.shape[1]
    tolerance = 2 * fan_in * np.finfo(np.float32).eps * magnitude
    if eps is not None:
        tolerance += 2 * magnitude * eps  # the final rounding to a narrow dtype
    return tolerance


def assert_combine_close(got, want, ye, plan, eps=None):
    assert got.dtype == want.dtype and got.shape == want.shape
    difference = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert np.all(difference <= combine_tolerance(ye, plan, got.dtype, eps))


@pytest.mark.parametrize(("router", "num_columns"), ROUTERS)
def test_kernels_match_agnostic_path(router, num_columns, on_reference):
    logits = logits_for(96, num_columns, bad_rows=[(5, np.nan), (9, -np.inf)])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 24)).astype(np.float32)
    plan = mr.make_plan(router(logits))
    ye = rng.standard_normal((plan.num_rows, 24)).astype(np.float32)
    fast = run_all(router, logits, x, ye)
    assert _registry.backend_for(x) is _numpy_backend.backend
    reference = on_reference(lambda: run_all(router, logits, x, ye))
    assert_same_plan(fast[0], reference[0])
    np.testing.assert_array_equal(fast[1], reference[1])  # dispatch: bit-identical
    assert fast[1].dtype == reference[1].dtype
    assert_combine_close(fast[2], reference[2], ye, fast[0])


@pytest.mark.parametrize(
    "logits",
    [
        # Grouped (G, S, E) logits with capacity per group.
        pytest.param(logits_for(40, 8, groups=3), id="grouped"),
        # Many exact ties inside rows: lower expert index wins on both paths.
        pytest.param(logits_for(64, 8, ties=True), id="ties"),
        # Every row non-finite: nothing routed, num_valid = 0.
        pytest.param(np.full((16, 8), np.nan, dtype=np.float32), id="nothing-routed"),
    ],
)
@pytest.mark.parametrize(
    "router",
    [
        pytest.param(mr.TopK(num_experts=8, k=3, capacity_factor=1.0), id="topk-capacity"),
        pytest.param(mr.ExpertChoice(num_experts=8, capacity_factor=1.5), id="expert-choice"),
    ],
)
def test_edge_inputs_match(router, logits, on_reference):
    num_tokens = logits.reshape(-1, 8).shape[0]
    x = np.random.default_rng(2).standard_normal((num_tokens, 8)).astype(np.float32)
    plan = mr.make_plan(router(logits))
    ye = np.random.default_rng(3).standard_normal((plan.num_rows, 8)).astype(np.float32)
    fast = run_all(router, logits, x, ye)
    reference = on_reference(lambda: run_all(router, logits, x, ye))
    assert_same_plan(fast[0], reference[0])
    np.testing.assert_array_equal(fast[1], reference[1])
    assert_combine_close(fast[2], reference[2], ye, fast[0])


def test_expert_layout_with_many_tokens(on_reference):
    # T > 65535: the token sort of the expert layout falls back from 16-bit radix to int32 keys.
    logits = logits_for(70_000, 2)
    router = mr.ExpertChoice(num_experts=2, capacity_factor=1.0)
    routing = router(logits)
    fast = mr.make_plan(routing)
    reference = on_reference(lambda: mr.make_plan(routing))
    assert_same_plan(fast, reference)


DTYPES = [
    # float32: the CSR path when SciPy is installed.
    pytest.param("float32", id="float32"),
    # float16 rows: the blocked path, accumulated in float32.
    pytest.param("float16", id="float16"),
    # float64 rows are still accumulated in float32, as on the agnostic path.
    pytest.param("float64", id="float64"),
    # bfloat16 via ml_dtypes, when installed.
    pytest.param(
        "bfloat16",
        id="bfloat16",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("ml_dtypes") is None, reason="ml_dtypes is not installed"
        ),
    ),
]


def as_dtype(array, name):
    if name == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "router",
    [
        pytest.param(mr.TopK(num_experts=8, k=2, capacity_factor=0.8), id="token-layout"),
        pytest.param(mr.ExpertChoice(num_experts=8, capacity_factor=2.0), id="expert-layout"),
    ],
)
def test_row_dtypes(router, dtype, on_reference):
    rng = np.random.default_rng(4)
    logits = logits_for(64, 8)
    x = as_dtype(rng.standard_normal((64, 16)), dtype)
    plan = mr.make_plan(router(logits))
    ye = as_dtype(rng.standard_normal((plan.num_rows, 16)), dtype)
    fast = run_all(router, logits, x, ye)
    reference = on_reference(lambda: run_all(router, logits, x, ye))
    assert fast[1].dtype == x.dtype
    np.testing.assert_array_equal(fast[1].view(np.uint8), reference[1].view(np.uint8))
    assert fast[2].dtype == ye.dtype
    got = fast[2].astype(np.float32)
    want = reference[2].astype(np.float32)
    # float16 and bfloat16 results are rounded once more, by up to an ulp of their own.
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}.get(dtype)
    assert_combine_close(got, want, ye.astype(np.float32), fast[0], eps)


@pytest.mark.parametrize(
    "router",
    [
        pytest.param(mr.TopK(num_experts=8, k=4, capacity_factor=0.6), id="token-layout"),
        pytest.param(mr.ExpertChoice(num_experts=8, capacity_factor=2.0), id="expert-layout"),
    ],
)
def test_without_scipy(router, monkeypatch, on_reference):
    # SciPy is optional: without it float32 combine runs the blocked path, which does the
    # agnostic path's arithmetic (w * row rounded, then added, slot by slot): equal bit for bit.
    monkeypatch.setattr(_numpy_backend, "_scipy_sparse", lambda: None)
    rng = np.random.default_rng(5)
    logits = logits_for(200, 8)
    plan = mr.make_plan(router(logits))
    ye = rng.standard_normal((plan.num_rows, 32)).astype(np.float32)
    got = mr.combine(ye, plan)
    want = on_reference(lambda: mr.combine(ye, plan))
    np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 12),
    data=st.data(),
)
def test_random_routings_match(num_tokens, num_experts, data):
    # Random sizes, tied or spread logits, both layouts, with and without capacity.
    k = data.draw(st.integers(1, num_experts))
    ties = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    router = data.draw(
        st.sampled_from(
            [
                mr.TopK(num_experts=num_experts, k=k),
                mr.TopK(num_experts=num_experts, k=k, capacity_factor=0.75),
                mr.ExpertChoice(num_experts=num_experts, capacity_factor=1.25),
            ]
        )
    )
    logits = logits_for(num_tokens, num_experts, seed=seed, ties=ties)
    routing = router(logits)
    fast = _numpy_backend.make_plan(routing)
    from moerouter._agnostic import plan as agnostic

    reference = agnostic.plan_arrays(
        routing.token_ids,
        routing.expert_ids,
        routing.weights,
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        fan_in=routing.fan_in,
        token_layout=routing.layout == "token",
        xp=np,
        device="cpu",
    )
    for name in (*INTEGER_FIELDS, "combine_weights"):
        np.testing.assert_array_equal(getattr(fast, name), reference[name], err_msg=name)
        assert getattr(fast, name).dtype == np.asarray(reference[name]).dtype, name
    ye = np.random.default_rng(seed).standard_normal((fast.num_rows, 3)).astype(np.float32)
    want = agnostic.combine(ye, reference["combine_rows"], reference["combine_weights"], xp=np)
    assert_combine_close(_numpy_backend.combine(ye, fast), want, ye, fast)
