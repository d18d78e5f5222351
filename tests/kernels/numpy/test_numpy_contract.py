"""Output buffers, threads, determinism and plan invariants of the NumPy kernels."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter import _numpy_backend

# Large enough that dispatch outputs (4 MiB) go through the buffer cache.
TOKENS, FEATURES = 512, 1024


@pytest.fixture
def plan():
    logits = np.random.default_rng(0).standard_normal((TOKENS, 16)).astype(np.float32)
    return mr.make_plan(mr.TopK(num_experts=16, k=2, capacity_factor=0.8)(logits))


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((TOKENS, FEATURES)).astype(np.float32)


def test_held_output_is_never_overwritten(plan, x):
    # The contract: a later call never writes into an array the caller still holds.
    first = mr.dispatch(x, plan)
    kept = first.copy()
    second = mr.dispatch(x * 2, plan)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)


def test_dropped_output_is_recycled(plan, x):
    # Once the caller drops the array, its memory is handed out again (no new page faults).
    first = mr.dispatch(x, plan)
    address = first.__array_interface__["data"][0]
    del first
    second = mr.dispatch(x, plan)
    assert second.__array_interface__["data"][0] == address


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda a: a[:10], id="slice-view"),  # a view holds its base
        pytest.param(lambda a: a.reshape(-1), id="reshape-view"),
        pytest.param(memoryview, id="memoryview"),  # a buffer export holds the array
        pytest.param(lambda a: np.from_dlpack(a), id="dlpack"),  # what torch/JAX imports hold
    ],
)
def test_views_and_exports_keep_the_buffer(plan, x, keep):
    first = mr.dispatch(x, plan)
    held = keep(first)
    snapshot = np.array(held, copy=True)
    del first
    second = mr.dispatch(x * 3, plan)
    np.testing.assert_array_equal(np.asarray(held), snapshot)
    assert not np.shares_memory(np.asarray(held), second)


def test_reshaping_the_result_does_not_reshape_the_cache(plan, x):
    # The caller gets a view: assigning .shape changes their array, not the cached one.
    first = mr.dispatch(x, plan)
    first.shape = (-1,)
    del first
    assert mr.dispatch(x, plan).shape == (plan.num_rows, FEATURES)


def test_cache_can_be_turned_off_and_cleared(plan, x, monkeypatch):
    monkeypatch.setenv("MOEROUTER_NUMPY_CACHE_MB", "0")
    mr.dispatch(x, plan)
    assert len(_numpy_backend._pool) == 0
    monkeypatch.delenv("MOEROUTER_NUMPY_CACHE_MB")
    held = mr.dispatch(x, plan)
    kept = held.copy()
    mr.dispatch(x, plan)  # dropped at once
    assert len(_numpy_backend._pool) == 2
    _numpy_backend.clear_cache()
    assert len(_numpy_backend._pool) == 0
    mr.dispatch(x * 2, plan)  # the forgotten held buffer is never handed out again
    np.testing.assert_array_equal(held, kept)


def test_out_arguments(plan, x):
    buffer = np.full((plan.num_rows, FEATURES), np.nan, dtype=np.float32)
    result = _numpy_backend.dispatch(x, plan, out=buffer)
    assert result is buffer
    np.testing.assert_array_equal(buffer, mr.dispatch(x, plan))
    output = np.empty((TOKENS, FEATURES), dtype=np.float32)
    assert _numpy_backend.combine(buffer, plan, out=output) is output
    np.testing.assert_array_equal(output, mr.combine(buffer, plan))
    with pytest.raises(ValueError, match="out must be"):
        _numpy_backend.dispatch(x, plan, out=np.empty((3, FEATURES), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        _numpy_backend.combine(buffer, plan, out=np.empty((TOKENS, FEATURES), np.float16))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_results(plan, x, threads, monkeypatch):
    # Force a split even at this small size; copies are exact whatever the split.
    monkeypatch.setattr(_numpy_backend, "_THREADED_MIN_BYTES", 1)
    monkeypatch.setenv("MOEROUTER_NUM_THREADS", str(threads))
    reference = x[plan.source_tokens]
    reference[int(plan.num_valid) :] = 0
    np.testing.assert_array_equal(mr.dispatch(x, plan), reference)


@pytest.mark.parametrize("blocked", [False, True], ids=["csr", "blocked"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_do_not_change_combine(plan, threads, blocked, monkeypatch):
    # Each token's sum is computed whole by one thread, so a forced split (3 threads: uneven
    # parts; capacity drops: uneven fan-in per token) gives bit-identical outputs.
    ye = np.random.default_rng(3).standard_normal((plan.num_rows, 64)).astype(np.float32)
    if blocked:
        monkeypatch.setattr(_numpy_backend, "_scipy_sparse", lambda: None)
    monkeypatch.setenv("MOEROUTER_NUM_THREADS", "1")
    whole = mr.combine(ye, plan).copy()
    monkeypatch.setattr(_numpy_backend, "_THREADED_MIN_BYTES", 1)
    monkeypatch.setenv("MOEROUTER_NUM_THREADS", str(threads))
    np.testing.assert_array_equal(mr.combine(ye, plan), whole)


def test_combine_is_deterministic_and_batch_invariant(plan):
    rng = np.random.default_rng(2)
    ye = rng.standard_normal((plan.num_rows, 64)).astype(np.float32)
    first = mr.combine(ye, plan)
    np.testing.assert_array_equal(first, mr.combine(ye, plan))
    # Reroute every other token: the remaining tokens' outputs stay bit-identical.
    logits = rng.standard_normal((TOKENS, 16)).astype(np.float32)
    other = mr.make_plan(mr.TopK(num_experts=16, k=2)(logits))
    same = ye[other.combine_rows[::2].reshape(-1)]
    rows = np.arange(same.shape[0], dtype=np.int32).reshape(-1, 2)
    sub = mr.Plan(
        group_sizes=other.group_sizes,
        order=other.order,
        inverse=other.inverse,
        source_tokens=other.source_tokens,
        num_valid=other.num_valid,
        combine_rows=rows,
        combine_weights=other.combine_weights[::2],
        num_tokens=rows.shape[0],
        num_experts=16,
    )
    padded = np.zeros((other.num_rows, 64), np.float32)
    padded[: same.shape[0]] = same
    alone = mr.combine(padded, sub)
    full = mr.combine(ye, other)
    np.testing.assert_array_equal(alone, full[::2])


@pytest.mark.parametrize("blocked", [False, True], ids=["csr", "blocked"])
def test_rows_past_num_valid_never_reach_the_output(plan, blocked, monkeypatch):
    # Experts may leave garbage (even inf/NaN) in rows that belong to no expert.
    if blocked:
        monkeypatch.setattr(_numpy_backend, "_scipy_sparse", lambda: None)
    ye = np.ones((plan.num_rows, 8), np.float32)
    ye[int(plan.num_valid) :] = np.nan
    result = mr.combine(ye, plan)
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(result[:, 0], plan.combine_weights.sum(axis=1), rtol=1e-6)


def test_plan_invariants(plan):
    num_rows = plan.num_rows
    np.testing.assert_array_equal(np.sort(plan.order), np.arange(num_rows))
    np.testing.assert_array_equal(plan.order[plan.inverse], np.arange(num_rows))
    assert int(plan.group_sizes.sum()) == int(plan.num_valid)
    expert_of_row = np.repeat(np.arange(16), plan.group_sizes)
    assert np.all(np.diff(expert_of_row) >= 0)
    real = plan.combine_rows[plan.combine_rows >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(int(plan.num_valid)))


def test_non_contiguous_inputs(plan, x):
    # Strided and Fortran-ordered rows gather the same values.
    strided = np.asfortranarray(np.repeat(x, 2, axis=1)[:, ::2])
    np.testing.assert_array_equal(mr.dispatch(strided, plan), mr.dispatch(x, plan))
    ye = mr.dispatch(x, plan)
    np.testing.assert_array_equal(mr.combine(np.asfortranarray(ye), plan), mr.combine(ye, plan))
