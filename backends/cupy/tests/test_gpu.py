"""The CUDA kernels against the NumPy reference (the agnostic path on NumPy arrays).

Marked ``gpu``: they need CuPy and a CUDA GPU, and skip (with the reason) without them. Integer
outputs must be identical; dispatch bit-identical; combine uses explicitly rounded float32
multiply-add in slot order, the reference's own arithmetic, so float32 results are compared
exactly and narrower dtypes within one rounding of their own.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import Backend, use_backend

_reason = Backend.CUPY.unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason is not None, reason=str(_reason))]

PLAN_INTEGERS = ("group_sizes", "order", "inverse", "source_tokens", "num_valid", "combine_rows")


@pytest.fixture(autouse=True)
def clean_registry():
    # The kernel set is off until it has passed here: switch it on by name.
    with use_backend(unverified="cupy-cuda"):
        yield


def reference(fn):
    """Run ``fn`` on the agnostic path."""
    with use_backend("reference"):
        return fn()


def host(array):
    import cupy

    return cupy.asnumpy(array)


def logits_for(num_tokens, num_experts, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    if ties:
        values = rng.integers(0, 3, size=(num_tokens, num_experts)).astype(np.float32)
    else:
        values = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
    values[3] = np.nan  # a non-finite row routes nowhere
    values[5, :2] = -np.inf  # -inf logits are never routed to
    return values


ROUTERS = [
    pytest.param(mr.TopK(num_experts=8, k=2), 8, id="topk"),  # token layout, fan-in k
    pytest.param(mr.TopK(num_experts=64, k=8, capacity_factor=0.5), 64, id="capacity"),  # drops
    pytest.param(mr.NullExperts(num_experts=8, num_null=8, k=4), 16, id="null"),  # -1 slots
    pytest.param(mr.ExpertChoice(num_experts=32, capacity_factor=2.0), 32, id="expert-choice"),
    pytest.param(mr.TopK(num_experts=300, k=2), 300, id="many-experts"),  # 301 sort bins
]


@pytest.mark.parametrize(("router", "num_columns"), ROUTERS)
@pytest.mark.parametrize("num_tokens", [7, 4096])  # one partial block; several blocks
def test_make_plan_matches_reference(router, num_columns, num_tokens):
    import cupy

    logits = logits_for(num_tokens, num_columns)
    routing_np = router(logits)
    want = reference(lambda: mr.make_plan(routing_np))
    got = mr.make_plan(router(cupy.asarray(logits)))
    for name in PLAN_INTEGERS:
        np.testing.assert_array_equal(host(getattr(got, name)), getattr(want, name), name)
    np.testing.assert_allclose(host(got.combine_weights), want.combine_weights, rtol=1e-6)


DTYPES = ["float32", "float16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [2048, 24, 13])  # 16-byte vectors; 4-byte; 2-byte words
@pytest.mark.parametrize(("router", "num_columns"), ROUTERS[:4])
def test_dispatch_and_combine_match_reference(router, num_columns, features, dtype):
    import cupy

    rng = np.random.default_rng(1)
    logits = logits_for(512, num_columns)
    plan_np = reference(lambda: mr.make_plan(router(logits)))
    x = rng.standard_normal((512, features)).astype(dtype)
    ye = rng.standard_normal((plan_np.num_rows, features)).astype(dtype)
    ye[int(plan_np.num_valid) :] = np.nan  # rows past num_valid must not reach the output
    want_x = reference(lambda: mr.dispatch(x, plan_np))
    want_y = reference(lambda: mr.combine(ye, plan_np))
    plan = mr.make_plan(router(cupy.asarray(logits)))
    got_x = host(mr.dispatch(cupy.asarray(x), plan))
    got_y = host(mr.combine(cupy.asarray(ye), plan))
    np.testing.assert_array_equal(got_x, want_x)
    if dtype == "float32":
        np.testing.assert_array_equal(got_y, want_y)
    else:
        np.testing.assert_allclose(got_y.astype(np.float32), want_y.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)  # fmt: skip


def test_combine_is_deterministic():
    import cupy

    logits = cupy.asarray(logits_for(4096, 64))
    plan = mr.make_plan(mr.TopK(num_experts=64, k=8)(logits))
    ye = cupy.random.default_rng(0).standard_normal((plan.num_rows, 1024), dtype=cupy.float32)
    first = mr.combine(ye, plan)
    for _ in range(3):
        assert bool(cupy.all(mr.combine(ye, plan) == first))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_experts", [8, 64, 256, 300])  # per-lane 1, 2, 8, 16
@pytest.mark.parametrize("ties", [False, True])
def test_fused_router_matches_topk(score, normalize, num_experts, ties):
    import cupy
    import moerouter_cupy

    k = min(8, num_experts)
    logits = logits_for(1000, num_experts, ties=ties)
    want = mr.TopK(num_experts=num_experts, k=k, score=score, normalize=normalize)(logits)
    got = moerouter_cupy.topk_router(cupy.asarray(logits), k=k, score=score, normalize=normalize)
    for name in ("token_ids", "expert_ids", "choice_ids", "finite_rows"):
        np.testing.assert_array_equal(host(getattr(got, name)), getattr(want, name), name)
    np.testing.assert_allclose(host(got.weights), want.weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(got.probs), want.probs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_router_reads_narrow_logits(dtype):
    import cupy
    import moerouter_cupy

    logits = logits_for(256, 64)
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        values = torch.asarray(logits, device="cuda").to(torch.bfloat16)
        expected_input = values.float().cpu().numpy()
    else:
        values = cupy.asarray(logits.astype(np.float16))
        expected_input = logits.astype(np.float16).astype(np.float32)
    want = mr.TopK(num_experts=64, k=4)(expected_input)
    got = moerouter_cupy.topk_router(values, k=4)
    np.testing.assert_array_equal(host(got.expert_ids), want.expert_ids)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_bfloat16_rows_round_trip_through_dlpack():
    # A torch CUDA tensor goes through the CuPy kernels without a copy and comes back as torch.
    import moerouter_cupy
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    logits = logits_for(256, 16)
    plan_np = reference(lambda: mr.make_plan(mr.TopK(num_experts=16, k=2)(logits)))
    routing = moerouter_cupy.topk_router(torch.asarray(logits, device="cuda"), k=2)
    plan = moerouter_cupy.make_plan(routing)
    x = torch.randn(256, 64, device="cuda").to(torch.bfloat16)
    xe = moerouter_cupy.dispatch(x, plan)
    assert isinstance(xe, torch.Tensor) and xe.dtype == torch.bfloat16
    want = reference(lambda: mr.dispatch(x.float().cpu().numpy(), plan_np))
    np.testing.assert_array_equal(xe.float().cpu().numpy(), want)
    y = moerouter_cupy.combine(xe, plan)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    want_y = reference(lambda: mr.combine(want, plan_np))
    np.testing.assert_allclose(y.float().cpu().numpy(), want_y, rtol=1e-2, atol=1e-2)
