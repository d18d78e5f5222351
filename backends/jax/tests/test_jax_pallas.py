"""Pallas kernels: the interpreter on the CPU at tiny shapes, and a real GPU when there is one.

Each interpreted grid step is a few XLA ops: keep R * column blocks small (T <= 12 here).
"""

import types

import jax
import jax.numpy as jnp
import moerouter_jax
import numpy as np
import pytest
from moerouter_jax import _kernels, _pallas

import moerouter as mr
from moerouter import _registry
from moerouter.testing import assert_close, reference_combine, reference_dispatch, to_numpy

HAS_GPU = any(device.platform == "gpu" for device in jax.devices())
T = 12

ROUTERS = [
    pytest.param(mr.TopK(num_experts=4, k=2), 4, id="topk"),  # fixed fan-in, all real
    pytest.param(mr.TopK(num_experts=4, k=2, capacity_factor=0.5), 4, id="drops"),  # -1 holes
    pytest.param(mr.NullExperts(num_experts=4, num_null=4, k=2), 8, id="null"),  # spare rows
    pytest.param(mr.ExpertChoice(num_experts=4, capacity_factor=1.5), 4, id="expert-choice"),
]


def randn(*shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def plan_for(router, columns, seed=0):
    return mr.make_plan(router(jnp.asarray(randn(T, columns, seed=seed))))


@pytest.mark.parametrize("width", [8, 12])  # 12: column blocks of 4, not the whole row
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_interpreted_kernels_match_reference(use_backend, router, columns, dtype, width):
    plan = plan_for(router, columns)
    x = jnp.asarray(randn(T, width, seed=1)).astype(dtype)
    ye = np.array(randn(plan.num_rows, width, seed=2))
    ye[int(plan.num_valid) :] = np.nan  # rows of no expert must never leak in
    ye = jnp.asarray(ye).astype(dtype)
    xe = _pallas.gather_rows(x, plan.source_tokens, plan.num_valid, interpret=True)
    np.testing.assert_array_equal(to_numpy(xe.astype(jnp.float32)), reference_dispatch(x, plan))
    y = _pallas.gather_reduce(ye, plan.combine_rows, plan.combine_weights, interpret=True)
    assert y.dtype == ye.dtype
    tol = 1e-6 if dtype == "float32" else 1e-2
    assert_close(y.astype(jnp.float32), reference_combine(ye, plan), "y", rtol=tol, atol=tol)
    unweighted = _pallas.gather_reduce(ye, plan.combine_rows, None, interpret=True)
    want = _kernels._xla_gather_reduce(ye, plan.combine_rows, None)  # a sum: same order, exact
    np.testing.assert_array_equal(to_numpy(unweighted), to_numpy(want))


@pytest.mark.parametrize(
    ("num_experts", "k", "score", "normalize"),
    [
        (8, 2, "softmax", True),  # Mixtral: a softmax over the chosen logits
        (6, 3, "sigmoid", True),  # DeepSeek-style sigmoid, renormalised; E and k not powers of 2
        (6, 3, "sigmoid", False),  # raw sigmoid scores
        (5, 1, "softmax", False),  # Switch: raw probability of the single choice
    ],
)
def test_interpreted_topk_router_matches_policy(num_experts, k, score, normalize):
    logits = randn(8, num_experts, seed=7)
    logits[3, 1] = logits[3, 4] = 5.0  # a tie inside a row: the lower column first
    router = mr.TopK(num_experts=num_experts, k=k, score=score, normalize=normalize)
    routing = router(jnp.asarray(logits))
    experts, weights = _pallas.topk_router(
        jnp.asarray(logits), k, score=score, normalize=normalize, interpret=True
    )
    assert experts.dtype == jnp.int32 and weights.dtype == jnp.float32
    np.testing.assert_array_equal(to_numpy(experts).ravel(), to_numpy(routing.expert_ids))
    assert_close(weights.ravel(), routing.weights, "weights", rtol=1e-6, atol=1e-7)


def hostile_logits(num_experts, seed):
    """Random rows with a tie, -inf masks (one row with fewer finite columns than k), a NaN
    row, a +inf row and an all -inf row: every case the policies route nowhere or part-way."""
    logits = randn(T, num_experts, seed=seed)
    logits[0, 1] = logits[0, 2] = 3.0
    logits[1, 1:] = -np.inf  # one finite column
    logits[2, ::2] = -np.inf
    logits[3, 0] = np.nan
    logits[4, 1] = np.inf
    logits[5] = -np.inf
    return logits


@pytest.mark.parametrize(
    ("num_experts", "k", "score", "normalize"),
    [(6, 3, "softmax", True), (6, 3, "sigmoid", True), (5, 2, "sigmoid", False)],
)
def test_interpreted_topk_router_on_masked_and_bad_rows(num_experts, k, score, normalize):
    # Once only -inf columns are left, a column is never picked twice: they follow in column
    # order, as the reference's stable sort puts them; bad rows choose as zero rows do.
    logits = hostile_logits(num_experts, seed=11)
    routing = mr.TopK(num_experts=num_experts, k=k, score=score, normalize=normalize)(
        jnp.asarray(logits)
    )
    experts, weights = _pallas.topk_router(
        jnp.asarray(logits), k, score=score, normalize=normalize, interpret=True
    )
    np.testing.assert_array_equal(to_numpy(experts).ravel(), to_numpy(routing.choice_ids))
    routed = to_numpy(routing.expert_ids) >= 0
    assert_close(to_numpy(weights).ravel()[routed], to_numpy(routing.weights)[routed], "weights")


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(mr.TopK(num_experts=6, k=3), id="topk"),
        pytest.param(mr.TopK(num_experts=6, k=2, score="sigmoid"), id="sigmoid"),
        pytest.param(mr.TopK(num_experts=6, k=2, normalize=False), id="raw"),
        pytest.param(mr.GShardTop2(num_experts=6, second_expert_policy="all"), id="gshard"),
    ],
)
def test_policies_reach_the_pallas_router_under_jit_and_grad(use_backend, monkeypatch, policy):
    # The router slot hands these calls to the fused kernel (interpreted here, as on a GPU):
    # integer fields equal the reference's, weights and their gradient agree within rounding.
    monkeypatch.setattr(_pallas, "INTERPRET", True)
    calls = []
    fused = _pallas.topk_router
    monkeypatch.setattr(_pallas, "topk_router", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    logits = jnp.asarray(hostile_logits(6, seed=5))
    upstream = jnp.asarray(randn(T * getattr(policy, "k", 2), seed=6))

    def run(logits):
        routing = policy(logits)
        return jnp.sum(routing.weights * upstream), routing

    def routed_on(kernels):
        monkeypatch.setattr(_kernels, "_use_pallas", lambda array: kernels)
        return jax.jit(jax.value_and_grad(run, has_aux=True))(logits)

    (value, got), grad = routed_on(True)
    assert calls, "the policy did not reach the Pallas router"
    (want_value, want), want_grad = routed_on(False)
    for name in ("choice_ids", "expert_ids", "token_ids"):
        np.testing.assert_array_equal(to_numpy(getattr(got, name)), to_numpy(getattr(want, name)))
    assert_close(got.weights, want.weights, "weights")
    assert_close(got.probs, want.probs, "probs")
    assert_close(value, want_value, "loss")
    assert_close(grad, want_grad, "gradient")
    assert np.isfinite(to_numpy(grad)).all()


@pytest.mark.parametrize(
    ("policy", "columns"),
    [
        pytest.param(mr.NullExperts(num_experts=4, num_null=2, k=2), 6, id="null"),
        pytest.param(mr.DeepSeekTopK(num_experts=6, k=2), 6, id="deepseek"),
        pytest.param(mr.TopK(num_experts=6, k=2, softmax_after_topk=True), 6, id="after"),
    ],
)
def test_calls_the_fused_router_does_not_cover_take_the_reference(monkeypatch, policy, columns):
    monkeypatch.setattr(_kernels, "_use_pallas", lambda array: True)
    monkeypatch.setattr(_pallas, "topk_router", None)  # would raise if called
    logits = jnp.asarray(randn(T, columns, seed=8))
    routing = policy(logits)
    assert routing.expert_ids.shape == (T * policy.k,)


def test_topk_router_rejects_bad_arguments():
    with pytest.raises(ValueError, match="score"):
        _pallas.topk_router(jnp.zeros((2, 4)), 2, score="relu", interpret=True)
    with pytest.raises(ValueError, match="k must"):
        _pallas.topk_router(jnp.zeros((2, 4)), 5, interpret=True)


class StopBeforeLowering(Exception):
    pass


GPU_CALLS = [
    pytest.param(
        lambda interpret: _pallas.gather_rows(
            jnp.zeros((4, 8)), jnp.zeros(4, jnp.int32), jnp.int32(4), interpret=interpret
        ),
        id="gather_rows",
    ),
    pytest.param(
        lambda interpret: _pallas.gather_reduce(
            jnp.zeros((4, 8)), jnp.zeros((2, 2), jnp.int32), None, interpret=interpret
        ),
        id="gather_reduce",
    ),
    pytest.param(
        lambda interpret: _pallas.topk_router(jnp.zeros((2, 4)), 2, interpret=interpret),
        id="topk_router",
    ),
]


@pytest.mark.parametrize("call", GPU_CALLS)
def test_gpu_calls_ask_for_the_triton_lowering(monkeypatch, call):
    # Since JAX 0.10 a pallas_call on GPU lowers to Mosaic GPU unless it is given Triton compiler
    # parameters; these kernels are written for the Triton lowering.
    from jax.experimental.pallas import triton as pltriton

    seen = {}

    def pallas_call(kernel, **options):
        seen.update(options)
        raise StopBeforeLowering

    monkeypatch.setattr(_pallas.pl, "pallas_call", pallas_call)
    with pytest.raises(StopBeforeLowering):
        call(False)
    assert isinstance(seen["compiler_params"], pltriton.CompilerParams)
    with pytest.raises(StopBeforeLowering):
        call(True)
    assert seen["compiler_params"] is None and seen["interpret"] is True


class OnGpu:
    """Stands for a jax.Array on a GPU."""

    def devices(self):
        return [types.SimpleNamespace(platform="gpu")]


def test_pallas_runs_only_on_gpu_while_its_set_is_on(monkeypatch):
    # The Pallas kernels have not passed on a GPU yet: XLA gathers run unless
    # MOEROUTER_UNVERIFIED_KERNELS names their set; CPU arrays never take them.
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    assert not _kernels._use_pallas(OnGpu())
    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "jax-pallas")
    assert _kernels._use_pallas(OnGpu())
    assert not _kernels._use_pallas(jnp.zeros(1))
    assert moerouter_jax.backend.kernel_sets == (_kernels.PALLAS,)


@pytest.fixture
def pallas_everywhere(monkeypatch):
    """Route the public kernels through Pallas (interpreted) as they would be on a GPU."""
    monkeypatch.setattr(_kernels, "_use_pallas", lambda array: True)
    monkeypatch.setattr(_pallas, "INTERPRET", True)


def test_public_path_with_pallas_under_jit_and_grad(use_backend, pallas_everywhere):
    router = mr.NullExperts(num_experts=4, num_null=2, k=2)
    logits = jnp.asarray(randn(T, 6, seed=3))
    x = jnp.asarray(randn(T, 4, seed=4))

    def loss(logits, x):
        plan = mr.make_plan(router(logits))
        return jnp.sum(mr.combine(jnp.sin(mr.dispatch(x, plan)), plan) ** 2)

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(logits, x)
    use_backend("reference")
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(logits, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, b, "loss or grad", rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU for JAX")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gpu_pallas_matches_xla_path(use_backend, router, columns, dtype):
    plan = plan_for(router, columns)
    x = jnp.asarray(randn(T, 256, seed=5)).astype(dtype)
    ye = jnp.asarray(randn(plan.num_rows, 256, seed=6)).astype(dtype)
    xe = _pallas.gather_rows(x, plan.source_tokens, plan.num_valid)
    np.testing.assert_array_equal(
        to_numpy(xe.astype(jnp.float32)),
        to_numpy(_kernels._xla_gather_rows(x, plan.source_tokens, plan.num_valid)).astype(
            np.float32
        ),
    )
    y = _pallas.gather_reduce(ye, plan.combine_rows, plan.combine_weights)
    np.testing.assert_array_equal(
        to_numpy(y.astype(jnp.float32)),
        to_numpy(_pallas.gather_reduce(ye, plan.combine_rows, plan.combine_weights)).astype(
            np.float32
        ),
    )  # bit-identical run to run
    tol = 1e-6 if dtype == "float32" else 1e-2
    assert_close(y.astype(jnp.float32), reference_combine(ye, plan), "y", rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU for JAX")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gpu_topk_router_matches_policy(score):
    logits = jnp.asarray(randn(256, 64, seed=8))
    routing = mr.TopK(num_experts=64, k=8, score=score)(logits)
    experts, weights = _pallas.topk_router(logits, 8, score=score)
    np.testing.assert_array_equal(to_numpy(experts).ravel(), to_numpy(routing.expert_ids))
    assert_close(weights.ravel(), routing.weights, "weights", rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU for JAX")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gpu_public_path_with_pallas_matches_xla(monkeypatch, use_backend, router, columns, dtype):
    # The public functions on a GPU with the jax-pallas set on (Pallas forward and backward)
    # against the same functions with it off (XLA gathers), under jit and grad.
    logits = jnp.asarray(randn(2048, columns, seed=12))
    x = jnp.asarray(randn(2048, 384, seed=13)).astype(dtype)  # 384: column blocks of 128

    def loss(logits, x):
        plan = mr.make_plan(router(logits))
        y = mr.combine(jnp.sin(mr.dispatch(x, plan)), plan)
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    def run():
        (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            logits, x
        )
        return [value, y, *grads]

    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "jax-pallas")
    got = run()
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE)
    want = run()
    tol = 1e-5 if dtype == "float32" else 2e-2
    for name, a, b in zip(["loss", "y", "grad logits", "grad x"], got, want, strict=True):
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), name, rtol=tol, atol=tol)
