"""Inputs a kernel cannot handle faithfully are refused by name, on every backend, before any work.

Failure model: an input of the wrong kind that a kernel silently converts. ``combine`` weights
and sums its rows in float32: integer or bool rows were truncated on NumPy and JAX (int32 rows
``[[10], [20]]`` with weights 0.95/0.05 gave 19 where float gave 20), complex rows lost their
imaginary part or failed, and torch raised a raw ``embedding_bag`` error. The check lives once in
the public layer (:mod:`moerouter.routing`), so every backend, and the agnostic path, gets it.

``dispatch`` with a plan is a gather: it copies any dtype exactly, and that stays allowed (the
rows are checked bit for bit here). A soft dispatch weights and sums, so it wants real floats.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import Backend, to_numpy, use_backend

# Each refused kind: what a weighted float32 sum would silently mangle.
BAD_DTYPES = [
    pytest.param("int32", id="int32"),  # truncated to an integer after the float32 sum
    pytest.param("int64", id="int64"),
    pytest.param("bool", id="bool"),  # summed as 0/1, or not at all
    pytest.param("complex64", id="complex64"),  # imaginary part dropped, or a raw error
]
GOOD_DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.fixture(params=["kernels", "reference"])
def path(request):
    """The backend's own kernels, and the agnostic path (MOEROUTER_BACKEND=reference)."""
    with use_backend("reference" if request.param == "reference" else "kernels"):
        yield request.param


def _plan(backend: Backend) -> mr.Plan:
    logits = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    return mr.make_plan(mr.TopK(num_experts=4, k=2)(backend.asarray(logits)))


def _array(backend: Backend, values: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        if backend.has_bfloat16:
            return backend.asarray(values, "bfloat16")
        if backend is Backend.NUMPY:
            return values.astype(pytest.importorskip("ml_dtypes").bfloat16)
        pytest.skip(f"{backend} has no bfloat16")
    if dtype == "float16" and not backend.has_float16:
        pytest.skip(f"{backend} has no float16")
    return backend.asarray(values, dtype)


def _with_x64(backend: Backend, dtype: str):
    """JAX makes 64-bit arrays only with x64 enabled, so those cases run inside its context."""
    if backend is not Backend.JAX or dtype not in ("int64", "float64"):
        from contextlib import nullcontext

        return nullcontext()
    import jax

    return jax.enable_x64(True)


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_combine_refuses_rows_that_are_not_real_floating(backend, path, dtype):
    with _with_x64(backend, dtype):
        plan = _plan(backend)
        ye = _array(backend, np.full((plan.num_rows, 3), 10), dtype)
        with pytest.raises(TypeError, match=rf"ye must be a real floating dtype.*{dtype}"):
            mr.combine(ye, plan)


@pytest.mark.parametrize("dtype", GOOD_DTYPES)
def test_combine_accepts_every_real_floating_dtype(backend, path, dtype):
    with _with_x64(backend, dtype):
        plan = _plan(backend)
        ye = _array(backend, np.full((plan.num_rows, 3), 20.0), dtype)
        y = to_numpy(mr.combine(ye, plan))
    # Each token's weights sum to 1: every output is 20 (to the dtype's rounding).
    np.testing.assert_allclose(y, 20.0, rtol=2**-7)


@pytest.mark.parametrize("dtype", ["int32", "bool", "complex64"])
def test_dispatch_copies_any_dtype_exactly(backend, path, dtype):
    plan = _plan(backend)
    values = np.arange(12).reshape(6, 2) * 7 + 1j * (dtype == "complex64")
    x = _array(backend, values if dtype == "complex64" else values.real % 3, dtype)
    xe = to_numpy(mr.dispatch(x, plan))
    valid = int(to_numpy(plan.num_valid))
    expected = to_numpy(x)[to_numpy(plan.source_tokens)[:valid]]
    assert xe.dtype == to_numpy(x).dtype
    np.testing.assert_array_equal(xe[:valid], expected)


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_soft_dispatch_and_combine_refuse_non_floating(backend, path, dtype):
    logits = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    soft = mr.SoftMoE(num_experts=4)(backend.asarray(logits))
    with pytest.raises(TypeError, match="x must be a real floating dtype"):
        mr.dispatch(_array(backend, np.ones((6, 3)), dtype), soft)
    with pytest.raises(TypeError, match="ye must be a real floating dtype"):
        mr.combine(_array(backend, np.ones((soft.num_slots, 3)), dtype), soft)
