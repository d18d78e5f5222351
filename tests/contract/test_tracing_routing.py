"""The routing family traces: ``jax.jit`` and ``torch.compile`` give the eager results.

DeepSeek's bias, GShard's uniform draws and the noise arrays are traced inputs; ``k`` and
``capacity_factor`` overrides are static Python values; the padded plan keeps static shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy

NUM_EXPERTS = 8


@pytest.fixture
def reference_backend(monkeypatch):
    # Trace the agnostic array-API path, whatever plugins provide.
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")


def inputs(seed):
    rng = np.random.default_rng(seed)
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=seed)
    return {
        "logits": logits,
        "bias": (rng.standard_normal(NUM_EXPERTS) * 0.3).astype(np.float32),
        "normal": rng.standard_normal(logits.shape).astype(np.float32),
        "uniform": rng.random(logits.shape[:-1]).astype(np.float32),
        "x": rng.standard_normal((32, 4)).astype(np.float32),
    }


DEEPSEEK = mr.DeepSeekTopK(
    NUM_EXPERTS, 2, num_groups=4, topk_groups=2, routed_scaling_factor=2.5, capacity_factor=1.0
)
GSHARD = mr.GShardTop2(NUM_EXPERTS, capacity_factor=1.0, drop_policy="batch_priority")
TOPK = mr.TopK(NUM_EXPERTS, 2, capacity_factor=1.0, min_capacity=2)


def layer(logits, bias, normal, uniform, x):
    """Every new piece at once: noise, three policies, a per-call override, a padded plan."""
    noisy = mr.vmoe_logit_noise(logits, normal)
    deepseek = DEEPSEEK(noisy, bias)
    gshard = GSHARD(logits, uniform)
    topk = TOPK(logits, k=3, capacity_factor=0.5)
    plan = mr.make_plan(deepseek, pad_to_capacity=True)
    y = mr.combine(mr.dispatch(x, plan) * 2.0, plan)
    new_bias = mr.update_expert_bias(bias, mr.stats.summary(deepseek)["tokens_per_expert"], 1e-3)
    return deepseek, gshard, topk, y, new_bias


def check(traced, eager):
    for got, want in zip(traced[:3], eager[:3], strict=True):
        assert_routing_equal(got, want, rtol=1e-6, atol=1e-7)
    assert_close(traced[3], eager[3], "y", rtol=1e-6, atol=1e-6)
    assert_close(traced[4], eager[4], "bias", rtol=0.0, atol=0.0)


def test_jax_jit_equals_eager(reference_backend):
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")  # makes Routing and Plan pytrees
    arrays = {name: jax.numpy.asarray(value) for name, value in inputs(60).items()}
    eager = layer(**arrays)
    jitted = jax.jit(layer)(**arrays)
    check(jitted, eager)


# array-api-compat's is_array_api_obj is lru_cache-wrapped; dynamo warns that it traces through the
# cache, which is harmless here (the cached predicate is a pure function of the type).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_equals_eager(reference_backend):
    # aot_eager traces forward and backward graphs as inductor would see them, without minutes of
    # C++ code generation on a 2-core CI machine.
    torch = pytest.importorskip("torch")
    arrays = {name: torch.asarray(value) for name, value in inputs(62).items()}
    eager = layer(**arrays)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(**arrays)
    check(compiled, eager)
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
