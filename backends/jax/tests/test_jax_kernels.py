"""The JAX kernels: integer plans identical to NumPy, float results against the float64 loop
references, and jit, vmap and grad (float64 gradient checks under a scoped ``enable_x64``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from moerouter_jax import _kernels
from x64 import enable_x64

import moerouter as mr
from moerouter.testing import (
    assert_close,
    assert_plan_equal,
    assert_routing_equal,
    edge_case_logits,
    reference_combine,
    reference_dispatch,
    reference_make_plan,
    to_numpy,
)

INTEGER_FIELDS = ("group_sizes", "order", "inverse", "source_tokens", "num_valid", "combine_rows")

ROUTERS = [
    pytest.param(mr.TopK(num_experts=8, k=2), 8, id="topk"),  # Mixtral: fixed fan-in
    # Sigmoid scores without renormalisation (DeepSeek-style raw weights).
    pytest.param(mr.TopK(num_experts=8, k=3, score="sigmoid", normalize=False), 8, id="sigmoid"),
    # Capacity drops by position: -1 holes inside the token layout.
    pytest.param(mr.TopK(num_experts=8, k=2, capacity_factor=0.5), 8, id="drops-position"),
    # Capacity drops by probability: a cross-token ranking under tracing.
    pytest.param(
        mr.TopK(num_experts=8, k=2, capacity_factor=0.75, drop_policy="probs"), 8, id="drops-probs"
    ),
    # Null experts: variable fan-in, rows past num_valid.
    pytest.param(mr.NullExperts(num_experts=4, num_null=4, k=2), 8, id="null-experts"),
    # Expert choice: the expert layout, fan-in up to E per token.
    pytest.param(mr.ExpertChoice(num_experts=8, capacity_factor=2.0), 8, id="expert-choice"),
]


def logits_for(columns, seed=0, groups=2, size=16):
    return jnp.asarray(edge_case_logits(groups, size, columns, seed=seed))


def randn(*shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_integer_plan_identical_to_numpy(use_backend, router, columns):
    logits = edge_case_logits(2, 16, columns, seed=3)
    plan = mr.make_plan(router(jnp.asarray(logits)))
    numpy_plan = mr.make_plan(router(logits))
    for name in INTEGER_FIELDS:
        got = to_numpy(getattr(plan, name))
        assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, to_numpy(getattr(numpy_plan, name)), err_msg=name)
    assert_plan_equal(plan, reference_make_plan(router(logits)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: float32 accumulation
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_dispatch_and_combine_match_float64_reference(use_backend, router, columns, dtype):
    plan = mr.make_plan(router(logits_for(columns, seed=4)))
    x = jnp.asarray(randn(32, 12, seed=5)).astype(dtype)
    ye = np.array(randn(plan.num_rows, 12, seed=6))
    ye[int(plan.num_valid) :] = np.nan  # rows of no expert must never leak into y
    ye = jnp.asarray(ye).astype(dtype)
    xe = mr.dispatch(x, plan)
    assert xe.dtype == x.dtype
    np.testing.assert_array_equal(to_numpy(xe.astype(jnp.float32)), reference_dispatch(x, plan))
    y = mr.combine(ye, plan)
    assert y.dtype == ye.dtype
    tol = 1e-6 if dtype == "float32" else 1e-2  # bfloat16: one rounding of the float32 sum
    assert_close(y.astype(jnp.float32), reference_combine(ye, plan), "y", rtol=tol, atol=tol)


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_kernels_equal_agnostic_path(use_backend, router, columns):
    # Same sums in the same order: combine is bit-identical to the agnostic path, and to itself.
    logits = logits_for(columns, seed=7)
    x = jnp.asarray(randn(32, 8, seed=8))
    plan = mr.make_plan(router(logits))
    ye = mr.dispatch(x, plan) * 1.5
    y = mr.combine(ye, plan)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(mr.combine(ye, plan)))
    use_backend("reference")
    reference_plan = mr.make_plan(router(logits))
    assert_plan_equal(plan, reference_plan, rtol=0.0, atol=0.0)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(mr.combine(ye, reference_plan)))


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_jit_route_equals_eager(use_backend, router, columns):
    logits = logits_for(columns, seed=9)
    x = jnp.asarray(randn(32, 4, seed=10))

    def layer(logits, x):
        routing = router(logits)
        plan = mr.make_plan(routing)
        return routing, plan, mr.combine(mr.dispatch(x, plan) * 2.0, plan)

    eager = layer(logits, x)
    jitted = jax.jit(layer)(logits, x)
    assert_routing_equal(jitted[0], eager[0], rtol=0.0, atol=1e-7)
    assert_plan_equal(jitted[1], eager[1], rtol=0.0, atol=1e-7)
    # XLA may fuse the float32 weight arithmetic differently: agree to rounding.
    assert_close(jitted[2], eager[2], "y", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_vmap_over_groups_equals_a_loop(use_backend, router, columns):
    logits = logits_for(columns, seed=11, groups=3, size=10)
    x = jnp.asarray(randn(3, 10, 5, seed=12))

    def one_group(logits, x):
        plan = mr.make_plan(router(logits))
        return mr.combine(jnp.tanh(mr.dispatch(x, plan)), plan), plan.group_sizes

    batched = jax.jit(jax.vmap(one_group))(logits, x)
    single = jax.jit(one_group)
    for g in range(3):
        y, sizes = single(logits[g], x[g])
        np.testing.assert_array_equal(to_numpy(batched[1][g]), to_numpy(sizes))
        assert_close(batched[0][g], y, "y", rtol=1e-6, atol=1e-6)


def plan_of(router, columns, seed):
    return mr.make_plan(router(jnp.asarray(edge_case_logits(1, 16, columns, seed=seed)[0])))


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_dispatch_combine_gradients_float64(use_backend, router, columns):
    # Reverse-mode gradients of the custom_vjp kernels against finite differences, in float64.
    plan = plan_of(router, columns, seed=13)
    with enable_x64():
        x = jnp.asarray(randn(16, 3, seed=14, dtype=np.float64))
        ye = jnp.asarray(randn(plan.num_rows, 3, seed=15, dtype=np.float64))
        weights = jnp.asarray(to_numpy(plan.combine_weights).astype(np.float64))
        check_grads(lambda x: _kernels.dispatch(x, plan), (x,), order=1, modes=["rev"])

        def combine(ye, weights):
            return _kernels._combine(
                ye, weights, plan.combine_rows, plan.source_tokens, plan.num_valid
            )

        check_grads(combine, (ye, weights), order=1, modes=["rev"])


def test_combine_gradient_is_zero_for_rows_of_no_expert(use_backend):
    # Rows past num_valid are never read: their gradient is exactly zero (and nothing is NaN).
    router = mr.NullExperts(num_experts=4, num_null=4, k=2)
    plan = plan_of(router, 8, seed=16)
    valid = int(plan.num_valid)
    assert valid < plan.num_rows
    ye = jnp.asarray(randn(plan.num_rows, 4, seed=17))
    grad = jax.grad(lambda ye: jnp.sum(mr.combine(ye, plan) ** 2))(ye)
    assert np.all(to_numpy(grad)[valid:] == 0)
    assert np.all(np.isfinite(to_numpy(grad)))


def test_kernels_contain_no_scatter_add(use_backend):
    # The gather-only promise, checked on the compiled program of forward and backward.
    router = mr.TopK(num_experts=4, k=2)
    logits = jnp.asarray(randn(16, 4, seed=18))
    x = jnp.asarray(randn(16, 8, seed=19))

    def loss(logits, x):
        plan = mr.make_plan(router(logits))
        return jnp.sum(mr.combine(mr.dispatch(x, plan) ** 2, plan))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(logits, x).as_text()
    scatters = [line for line in text.splitlines() if "scatter" in line and "add" in line]
    assert not scatters, scatters[:3]


def test_deterministic_run_to_run(use_backend):
    router = mr.ExpertChoice(num_experts=8, capacity_factor=2.0)
    logits = logits_for(8, seed=20)
    x = jnp.asarray(randn(32, 16, seed=21))

    def loss(x, logits):
        plan = mr.make_plan(router(logits))
        return jnp.sum(mr.combine(jnp.sin(mr.dispatch(x, plan)), plan) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    first = step(x, logits)
    for _ in range(3):
        again = step(x, logits)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
