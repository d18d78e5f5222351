"""Every policy traces: ``jax.jit`` and ``torch.compile`` give the eager routing (static shapes)."""

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
)

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


@pytest.fixture
def reference_backend(monkeypatch):
    # Be sure the agnostic array-API path is what is traced, whatever plugins provide.
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")


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
