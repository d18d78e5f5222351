"""Every policy traces: ``jax.jit`` and ``torch.compile`` give the eager results (static shapes).

Three groups: each core policy alone, through a whole layer (plan, losses, stats); the routing
family in one layer (DeepSeek's bias, GShard's uniform draws and the noise arrays are traced
inputs, ``k`` and ``capacity_factor`` overrides static Python values, the padded plan keeps static
shapes), with the hash, frozen and cosine gates; and the policies that take a side input
(locality, anchor, affinity) under ``torch.compile`` as one graph (their ``jax.jit`` tests sit
beside each policy's equivalence tests).
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import (
    assert_close,
    assert_plan_equal,
    assert_routing_equal,
    edge_case_logits,
    to_numpy,
    use_backend,
)


@pytest.fixture
def reference_backend():
    # Trace the agnostic array-API path, whatever plugins provide.
    with use_backend("reference"):
        yield


# --------------------------------------------------------------------------------------------
# Each policy alone, through a layer


ROUTERS = [
    # Token choice with capacity: the drop logic must stay shape-static.
    pytest.param(
        mr.TopK(num_experts=8, k=2, capacity_factor=0.75, drop_policy="probs"), 8, id="topk"
    ),
    # Null experts: masked softmax and -1 experts under tracing.
    pytest.param(mr.NullExperts(num_experts=4, num_null=4, k=2), 8, id="null-experts"),
    # Expert choice: argsort over tokens, expert layout.
    pytest.param(mr.ExpertChoice(num_experts=8, capacity_factor=2.0), 8, id="expert-choice"),
]


@pytest.mark.parametrize(("router", "num_columns"), ROUTERS)
def test_jax_jit_equals_eager(reference_backend, router, num_columns):
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")  # makes Routing and Plan pytrees
    logits = jax.numpy.asarray(edge_case_logits(2, 16, num_columns, seed=16))
    x = jax.numpy.asarray(np.random.default_rng(17).standard_normal((32, 4)).astype(np.float32))

    def layer(logits, x):
        routing = router(logits)
        plan = mr.make_plan(routing)
        y = mr.combine(mr.dispatch(x, plan) * 2.0, plan)
        return routing, y, mr.losses.load_balancing(routing), mr.stats.summary(routing)

    eager = layer(logits, x)
    jitted = jax.jit(layer)(logits, x)
    assert_routing_equal(jitted[0], eager[0], rtol=0.0, atol=1e-7)
    # XLA may fuse the float32 arithmetic differently: agree to rounding, not bit for bit.
    assert_close(jitted[1], eager[1], "y", rtol=1e-6, atol=1e-6)
    assert_close(jitted[2], eager[2], "load_balancing", rtol=1e-6)
    for name, value in eager[3].items():
        assert_close(jitted[3][name], value, name, rtol=1e-6, atol=1e-7)


def test_jax_jit_returns_a_plan(reference_backend):
    # A Plan made inside jit and returned from it must be the eager plan.
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    logits = jax.numpy.asarray(edge_case_logits(2, 16, 8, seed=16))
    router = mr.TopK(num_experts=8, k=2)
    jitted = jax.jit(lambda logits: mr.make_plan(router(logits)))(logits)
    assert_plan_equal(jitted, mr.make_plan(router(logits)), rtol=0.0, atol=0.0)


# array-api-compat's is_array_api_obj is lru_cache-wrapped; dynamo warns that it traces through the
# cache, which is harmless here (the cached predicate is a pure function of the type).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_equals_eager(reference_backend):
    # One small compiled layer: the agnostic path must trace under dynamo as one graph and give
    # eager's result. aot_eager traces forward and backward graphs exactly as inductor would see
    # them, without minutes of C++ code generation on a 2-core CI machine.
    torch = pytest.importorskip("torch")
    router = mr.TopK(num_experts=8, k=2, capacity_factor=0.75)
    logits = torch.asarray(edge_case_logits(1, 16, 8, seed=18)[0])
    x = torch.asarray(np.random.default_rng(19).standard_normal((16, 4)).astype(np.float32))

    def layer(logits, x):
        routing = router(logits)
        plan = mr.make_plan(routing)
        return routing.expert_ids, routing.weights, mr.combine(mr.dispatch(x, plan), plan)

    eager = layer(logits, x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(logits, x)
    np.testing.assert_array_equal(to_numpy(compiled[0]), to_numpy(eager[0]))
    assert_close(compiled[1], eager[1], "weights", rtol=1e-6, atol=0.0)
    assert_close(compiled[2], eager[2], "y", rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The routing family in one layer


FAMILY_EXPERTS = 8


def family_inputs(seed):
    rng = np.random.default_rng(seed)
    logits = edge_case_logits(2, 16, FAMILY_EXPERTS, seed=seed)
    return {
        "logits": logits,
        "bias": (rng.standard_normal(FAMILY_EXPERTS) * 0.3).astype(np.float32),
        "normal": rng.standard_normal(logits.shape).astype(np.float32),
        "uniform": rng.random(logits.shape[:-1]).astype(np.float32),
        "x": rng.standard_normal((32, 4)).astype(np.float32),
    }


DEEPSEEK = mr.DeepSeekTopK(
    FAMILY_EXPERTS, 2, num_groups=4, topk_groups=2, routed_scaling_factor=2.5, capacity_factor=1.0
)
GSHARD = mr.GShardTop2(FAMILY_EXPERTS, capacity_factor=1.0, drop_policy="batch_priority")
TOPK = mr.TopK(FAMILY_EXPERTS, 2, capacity_factor=1.0, min_capacity=2)


def family_layer(logits, bias, normal, uniform, x):
    """Every new piece at once: noise, three policies, a per-call override, a padded plan."""
    noisy = mr.vmoe_logit_noise(logits, normal)
    deepseek = DEEPSEEK(noisy, bias)
    gshard = GSHARD(logits, uniform)
    topk = TOPK(logits, k=3, capacity_factor=0.5)
    plan = mr.make_plan(deepseek, pad_to_capacity=True)
    y = mr.combine(mr.dispatch(x, plan) * 2.0, plan)
    new_bias = mr.update_expert_bias(bias, mr.stats.summary(deepseek)["tokens_per_expert"], 1e-3)
    return deepseek, gshard, topk, y, new_bias


def family_check(traced, eager):
    for got, want in zip(traced[:3], eager[:3], strict=True):
        assert_routing_equal(got, want, rtol=1e-6, atol=1e-7)
    assert_close(traced[3], eager[3], "y", rtol=1e-6, atol=1e-6)
    assert_close(traced[4], eager[4], "bias", rtol=0.0, atol=0.0)


def test_family_jax_jit_equals_eager(reference_backend):
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")  # makes Routing and Plan pytrees
    arrays = {name: jax.numpy.asarray(value) for name, value in family_inputs(60).items()}
    eager = family_layer(**arrays)
    jitted = jax.jit(family_layer)(**arrays)
    family_check(jitted, eager)


# array-api-compat's is_array_api_obj is lru_cache-wrapped; dynamo warns that it traces through the
# cache, which is harmless here (the cached predicate is a pure function of the type).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_family_torch_compile_equals_eager(reference_backend):
    # aot_eager traces forward and backward graphs as inductor would see them, without minutes of
    # C++ code generation on a 2-core CI machine.
    torch = pytest.importorskip("torch")
    arrays = {name: torch.asarray(value) for name, value in family_inputs(62).items()}
    eager = family_layer(**arrays)
    compiled = torch.compile(family_layer, backend="aot_eager", fullgraph=True)(**arrays)
    family_check(compiled, eager)
    assert to_numpy(compiled[3]).shape == (32, 4)


def test_jax_jit_hash_frozen_and_cosine(reference_backend):
    # The helpers of items 4-6 trace too: the hash table and the frozen weights become constants.
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    jnp = jax.numpy
    router = mr.HashRouter(8, table=mr.random_hash_table(40, 8, seed=0, k=2))
    ids = jnp.asarray(np.arange(-1, 45, dtype=np.int32))  # padding and out-of-vocabulary ids
    assert_routing_equal(jax.jit(router)(ids), router(ids), rtol=0.0, atol=0.0)
    gate = mr.FrozenRandomRouter(16, 8, seed=1)
    rng = np.random.default_rng(63)
    x = jnp.asarray(rng.standard_normal((6, 16)).astype(np.float32))
    assert_close(jax.jit(gate)(x), gate(x), "frozen logits", rtol=1e-6, atol=1e-6)
    w = jnp.asarray(rng.standard_normal((16, 8)).astype(np.float32))
    tau = jnp.asarray([0.5], dtype=jnp.float32)
    assert_close(
        jax.jit(mr.cosine_router_logits)(x, w, tau),
        mr.cosine_router_logits(x, w, tau),
        "cosine logits",
        rtol=1e-6,
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------------
# Policies with a side input


SIDE_TOKENS, SIDE_EXPERTS = 16, 8
SIDE_RNG = np.random.default_rng(40)
SIDE_INPUTS = {
    "locality": SIDE_RNG.integers(0, 4, SIDE_TOKENS).astype(np.int32),  # token nodes
    "anchor": SIDE_RNG.integers(-1, 3, SIDE_TOKENS).astype(np.int32),  # anchor ids
    "affinity": SIDE_RNG.uniform(-1, 1, (SIDE_TOKENS, SIDE_EXPERTS)).astype(np.float32),
}
SIDE_INPUT_ROUTERS = [
    # Node masks and capacity must stay shape-static.
    pytest.param(
        "locality",
        mr.policies.LocalityTopK(SIDE_EXPERTS, 2, num_nodes=4, max_nodes=2, capacity_factor=0.75),
        id="locality",
    ),
    # The one-hot anchor means: a matmul, no scatter.
    pytest.param(
        "anchor",
        mr.policies.AnchorRouting(mr.TopK(num_experts=SIDE_EXPERTS, k=2), num_anchors=3),
        id="anchor",
    ),
    # Affinity ranking across tokens and the capacity drop.
    pytest.param(
        "affinity",
        mr.policies.AffinityRouting(num_experts=SIDE_EXPERTS, capacity_factor=0.5),
        id="affinity",
    ),
]


# array-api-compat's is_array_api_obj is lru_cache-wrapped; dynamo warns that it traces through the
# cache, which is harmless here (the cached predicate is a pure function of the type).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize(("kind", "router"), SIDE_INPUT_ROUTERS)
def test_side_input_torch_compile_equals_eager(reference_backend, kind, router):
    torch = pytest.importorskip("torch")
    logits = torch.asarray(edge_case_logits(1, SIDE_TOKENS, SIDE_EXPERTS, seed=41)[0])
    side = torch.asarray(SIDE_INPUTS[kind])

    def layer(logits, side):
        routing = router(logits, side)
        return routing.expert_ids, routing.weights

    eager = layer(logits, side)
    # aot_eager traces forward and backward graphs as inductor would, without code generation.
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(logits, side)
    np.testing.assert_array_equal(to_numpy(compiled[0]), to_numpy(eager[0]))
    assert_close(compiled[1], eager[1], "weights", rtol=1e-6, atol=0.0)
