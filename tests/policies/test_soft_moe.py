"""Soft MoE on every backend: weights, dispatch and combine against float64 loops; gradients.

The float64 twins are :func:`~moerouter.testing.reference.soft.reference_soft_moe`,
``reference_soft_dispatch`` and ``reference_soft_combine``.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, edge_case_logits, to_numpy
from moerouter.testing.reference.soft import (
    reference_soft_combine,
    reference_soft_dispatch,
    reference_soft_moe,
)

SHAPES = [
    # (T, E * P) logits: 4 experts with 2 slots each.
    pytest.param(4, 2, (1, 16), id="2d"),
    # (G, S, E * P) logits, groups mixed independently.
    pytest.param(4, 2, (2, 16), id="groups"),
    # One slot per expert (the paper's default at capacity factor 1 when S = E).
    pytest.param(8, 1, (2, 16), id="one-slot"),
]

# matmul in float32 over S = 16 or N = 8 terms of magnitude < 4 against float64.
MIX_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _logits(num_experts, slots, groups, seed):
    logits = edge_case_logits(*groups, num_experts * slots, seed=seed)
    return logits[0] if groups[0] == 1 else logits


@pytest.mark.parametrize(("num_experts", "slots", "groups"), SHAPES)
def test_soft_moe_weights(backend, num_experts, slots, groups):
    logits = _logits(num_experts, slots, groups, seed=40)
    soft = mr.SoftMoE(num_experts=num_experts, slots_per_expert=slots)(backend.asarray(logits))
    expected = reference_soft_moe(logits, num_experts, slots)
    for name in ("dispatch_weights", "combine_weights"):
        assert_close(getattr(soft, name), expected[name], name)
        assert str(getattr(soft, name).dtype).endswith("float32")
    np.testing.assert_array_equal(to_numpy(soft.finite_rows), expected["finite_rows"])
    assert soft.num_slots == num_experts * slots
    # Invariants: a slot's weights sum to 1 over its group's tokens (every slot has a routable
    # token here); a finite token's weights sum to 1 over slots, a non-finite token's to 0.
    dispatch = to_numpy(soft.dispatch_weights).reshape(-1, groups[1], num_experts * slots)
    np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, rtol=1e-5)
    combine = to_numpy(soft.combine_weights).reshape(-1, num_experts * slots)
    np.testing.assert_allclose(
        combine.sum(axis=1), expected["finite_rows"].astype(float), atol=1e-5
    )


@pytest.mark.parametrize(("num_experts", "slots", "groups"), SHAPES)
def test_soft_dispatch_combine(backend, num_experts, slots, groups):
    logits = _logits(num_experts, slots, groups, seed=41)
    rng = np.random.default_rng(42)
    x = rng.standard_normal((*logits.shape[:-1], 5)).astype(np.float32)
    ye = rng.standard_normal((*logits.shape[:-2], num_experts * slots, 5)).astype(np.float32)
    soft = mr.SoftMoE(num_experts=num_experts, slots_per_expert=slots)(backend.asarray(logits))
    expected = reference_soft_moe(logits, num_experts, slots)
    xe = mr.dispatch(backend.asarray(x), soft)
    assert_close(xe, reference_soft_dispatch(x, expected["dispatch_weights"]), "xe", **MIX_TOL)
    y = mr.combine(backend.asarray(ye), soft)
    assert_close(y, reference_soft_combine(ye, expected["combine_weights"]), "y", **MIX_TOL)
    # Non-finite rows read nothing back.
    assert np.all(to_numpy(y).reshape(-1, 5)[~expected["finite_rows"]] == 0.0)


def test_soft_dispatch_keeps_dtype_accumulates_float32(backend):
    # Half inputs come back half, but the sums are float32 (S = 64 equal terms of 1 + 2^-9
    # would lose the 2^-9 part in a float16 running sum).
    if not backend.has_float16:
        pytest.skip(f"{backend} has no float16")
    soft = mr.SoftMoE(num_experts=1)(backend.asarray(np.zeros((64, 1), np.float32)))
    x = np.full((64, 1), 1.0 + 2.0**-9, np.float32)
    xe = mr.dispatch(backend.asarray(x, dtype="float16"), soft)
    assert "float16" in str(xe.dtype)
    assert to_numpy(xe).astype(np.float64)[0, 0] == np.float16(1.0 + 2.0**-9)


NUM_TOKENS, NUM_EXPERTS, SLOTS, FEATURES = 5, 2, 2, 3
RNG = np.random.default_rng(43)
LOGITS = RNG.standard_normal((NUM_TOKENS, NUM_EXPERTS * SLOTS))
X = RNG.standard_normal((NUM_TOKENS, FEATURES))
TARGET = RNG.standard_normal((NUM_TOKENS, FEATURES))
SCALE = np.asarray([0.5, -1.5])  # expert e computes tanh(SCALE[e] * x)


def _softmax(values, axis):
    exp = np.exp(values - values.max(axis=axis, keepdims=True))
    return exp / exp.sum(axis=axis, keepdims=True)


def dense_loss(logits, x):
    """The float64 Soft MoE layer: sum(target * y)."""
    dispatch, combine = _softmax(logits, 0), _softmax(logits, 1)
    slots = dispatch.T @ x
    outputs = np.tanh(np.repeat(SCALE, SLOTS)[:, None] * slots)
    return float(np.sum((combine @ outputs) * TARGET))


def finite_difference(function, point, step=1e-6):
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        up, down = point.copy(), point.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (function(up) - function(down)) / (2 * step)
    return grad


EXPECTED_GRADS = (
    finite_difference(lambda v: dense_loss(v, X), LOGITS),
    finite_difference(lambda v: dense_loss(LOGITS, v), X),
)
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}


def _layer(xp, logits, x):
    soft = mr.SoftMoE(num_experts=NUM_EXPERTS, slots_per_expert=SLOTS)(logits)
    slots = mr.dispatch(x, soft)
    scale = xp.asarray(np.repeat(SCALE, SLOTS).astype(np.float32))
    y = mr.combine(xp.tanh(scale[:, None] * slots), soft)
    return xp.sum(y * xp.asarray(TARGET.astype(np.float32)))


def test_soft_moe_gradients_torch():
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace

    logits = torch.asarray(LOGITS.astype(np.float32), requires_grad=True)
    x = torch.asarray(X.astype(np.float32), requires_grad=True)
    _layer(array_namespace(logits), logits, x).backward()
    assert_close(logits.grad, EXPECTED_GRADS[0], "d logits", **GRAD_TOL)
    assert_close(x.grad, EXPECTED_GRADS[1], "d x", **GRAD_TOL)


def test_soft_moe_gradients_jax():
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    grads = jax.grad(lambda a, b: _layer(jax.numpy, a, b), argnums=(0, 1))(
        jax.numpy.asarray(LOGITS.astype(np.float32)), jax.numpy.asarray(X.astype(np.float32))
    )
    assert_close(grads[0], EXPECTED_GRADS[0], "d logits", **GRAD_TOL)
    assert_close(grads[1], EXPECTED_GRADS[1], "d x", **GRAD_TOL)


def test_soft_moe_under_jit():
    # SoftRouting is a pytree: it can be built inside jax.jit and returned from it.
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    router = mr.SoftMoE(num_experts=NUM_EXPERTS, slots_per_expert=SLOTS)
    logits = jax.numpy.asarray(LOGITS.astype(np.float32))
    jitted = jax.jit(router)(logits)
    eager = router(logits)
    assert_close(jitted.dispatch_weights, eager.dispatch_weights, "dispatch", rtol=1e-6)
    assert_close(jitted.combine_weights, eager.combine_weights, "combine", rtol=1e-6)
    assert jitted.slots_per_expert == SLOTS


# array-api-compat's is_array_api_obj is lru_cache-wrapped; dynamo warns that it traces through the
# cache, which is harmless here (the cached predicate is a pure function of the type).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_soft_moe_torch_compile(monkeypatch):
    # aot_eager traces forward and backward graphs as inductor would, without C++ compilation.
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace

    logits = torch.asarray(LOGITS.astype(np.float32))
    x = torch.asarray(X.astype(np.float32))
    layer = lambda a, b: _layer(array_namespace(a), a, b)  # noqa: E731
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(logits, x)
    assert_close(compiled, layer(logits, x), "loss", rtol=1e-6, atol=1e-6)


def test_soft_moe_errors(backend):
    xp = backend.namespace()
    with pytest.raises(ValueError, match="slots_per_expert"):
        mr.SoftMoE(num_experts=2, slots_per_expert=0)
    with pytest.raises(TypeError, match="num_experts"):
        mr.SoftMoE(num_experts=2.0)
    router = mr.SoftMoE(num_experts=2, slots_per_expert=2)
    with pytest.raises(ValueError, match="num_experts \\* slots_per_expert"):
        router(backend.asarray(np.zeros((4, 3), np.float32)))
    soft = router(backend.asarray(np.zeros((4, 4), np.float32)))
    with pytest.raises(ValueError, match="x must have shape"):
        mr.dispatch(backend.asarray(np.zeros((5, 3), np.float32)), soft)
    with pytest.raises(ValueError, match="ye must have shape"):
        mr.combine(backend.asarray(np.zeros((3, 3), np.float32)), soft)
    with pytest.raises(TypeError, match="x must be a real floating"):
        mr.dispatch(xp.zeros((4, 3), dtype=xp.int32), soft)
    if backend.value != "numpy":
        with pytest.raises(TypeError, match="one backend"):
            mr.dispatch(np.zeros((4, 3), np.float32), soft)
