"""ReLURouting (ReMoE): references, every backend, properties, state, tracing, errors, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
from adaptive_cases import (
    COMPILE_WARNING,
    LIGHT_BACKENDS,
    PROPERTY,
    assert_on_meta,
    jax_jitted,
    same_routing,
    torch_compiled,
)
from hypothesis import given
from hypothesis import strategies as st

import moerouter as mr
from moerouter.policies import ReLURoutingState, relu_state_init, update_l1_coefficient
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy
from moerouter.testing.reference.adaptive import reference_relu_l1_loss, reference_relu_routing

E = 8

OPTIONS = [
    # No cap: exactly the paper's rule (every positive gate routes).
    pytest.param({"max_k": E}, id="uncapped"),
    # A cap that bites on rows with many positive logits.
    pytest.param({"max_k": 2}, id="cap-2"),
    # Capacity drops on top of the cap.
    pytest.param({"max_k": 3, "capacity_factor": 0.5}, id="capacity-position"),
    pytest.param({"max_k": 3, "capacity_factor": 0.5, "drop_policy": "probs"}, id="capacity-probs"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_reference_on_every_backend(backend, options):
    # Edge rows: -inf entries, NaN, +inf, all -inf, ties inside a row and between tokens.
    logits = edge_case_logits(2, 16, E, seed=11)
    routing = mr.ReLURouting(E, **options)(backend.asarray(logits))
    assert_routing_equal(routing, reference_relu_routing(logits, **options))


@pytest.mark.parametrize("options", OPTIONS)
def test_backends_give_identical_integers(backend, options):
    logits = np.random.default_rng(12).standard_normal((3, 32, E)).astype(np.float32)
    expected = mr.ReLURouting(E, **options)(logits)
    same_routing(mr.ReLURouting(E, **options)(backend.asarray(logits)), expected)


@st.composite
def small_integer_logits(draw):
    groups, tokens = draw(st.integers(1, 2)), draw(st.integers(1, 9))
    experts = draw(st.integers(1, 6))
    size = groups * tokens * experts
    entries = st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, -math.inf])
    flat = draw(st.lists(entries, min_size=size, max_size=size))
    logits = np.asarray(flat, np.float32).reshape(groups, tokens, experts)
    if draw(st.booleans()):  # an all-negative row: routes nowhere, output zero
        logits[0, 0] = -1.0
    return logits, experts, draw(st.integers(1, experts))


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
@PROPERTY
@given(case=small_integer_logits())
def test_properties(backend, case):
    # Small integer logits with zeros and -inf: ties and boundary gates are the rule.
    logits, experts, max_k = case
    routing = mr.ReLURouting(experts, max_k=max_k)(backend.asarray(logits))
    assert_routing_equal(routing, reference_relu_routing(logits, max_k))
    flat = logits.reshape(-1, experts)
    ids = to_numpy(routing.expert_ids).reshape(-1, max_k)
    weights = to_numpy(routing.weights).reshape(-1, max_k)
    for t in range(flat.shape[0]):
        positive = int(np.sum(flat[t] > 0))
        # Every positive gate routes, up to the cap; zero or negative logits never do.
        assert int(np.sum(ids[t] >= 0)) == min(positive, max_k)
        assert np.all(weights[t][ids[t] >= 0] > 0)
        if positive == 0:  # all-negative (or zero) row
            assert np.all(ids[t] == -1) and np.all(weights[t] == 0)
    finite = to_numpy(routing.finite_rows)
    expected = 1.0 - np.mean(flat[finite] > 0) if finite.any() else 1.0
    assert float(mr.losses.relu_sparsity(routing)) == pytest.approx(expected, abs=1e-6)


def test_all_negative_rows_give_zero_output_and_sparsity_one():
    logits = -np.abs(np.random.default_rng(1).standard_normal((5, E))).astype(np.float32)
    routing = mr.ReLURouting(E, max_k=E)(logits)
    plan = mr.make_plan(routing)
    assert int(plan.num_valid) == 0
    y = mr.combine(mr.dispatch(np.ones((5, 3), np.float32), plan), plan)
    assert np.all(np.asarray(y) == 0)
    assert float(mr.losses.relu_sparsity(routing)) == 1.0
    assert float(mr.losses.relu_l1_loss(routing)) == 0.0


@pytest.mark.parametrize("target_k", [None, 2])
def test_losses_against_references(backend, target_k):
    logits = edge_case_logits(1, 16, E, seed=13)
    routing = mr.ReLURouting(E, max_k=3)(backend.asarray(logits))
    want = reference_relu_l1_loss(routing, target_k)
    got = {
        "l1": mr.losses.relu_l1_loss(routing, target_k=target_k),
        "sparsity": mr.losses.relu_sparsity(routing),
        "cut_fraction": mr.losses.relu_cut_fraction(routing),
    }
    for name, value in got.items():
        assert_close(to_numpy(value), np.asarray(want[name]), name)


def test_cut_fraction_is_zero_without_a_cap():
    logits = np.random.default_rng(2).standard_normal((20, E)).astype(np.float32)
    assert float(mr.losses.relu_cut_fraction(mr.ReLURouting(E, max_k=E)(logits))) == 0.0
    assert float(mr.losses.relu_cut_fraction(mr.ReLURouting(E, max_k=1)(logits))) > 0.0


def test_coefficient_update_follows_the_authors_code(xp):
    state = relu_state_init(1e-8, xp=xp)
    # Below the target (too dense): multiply by alpha; at or above it: divide (code, not paper).
    grown = update_l1_coefficient(state, xp.asarray(0.5), target_sparsity=0.875)
    kept = update_l1_coefficient(state, xp.asarray(0.875), target_sparsity=0.875)
    shrunk = update_l1_coefficient(state, xp.asarray(0.95), target_sparsity=0.875)
    assert float(grown.coefficient) == pytest.approx(1.2e-8, rel=1e-6)
    assert float(kept.coefficient) == pytest.approx(1e-8 / 1.2, rel=1e-6)
    assert float(shrunk.coefficient) == pytest.approx(1e-8 / 1.2, rel=1e-6)
    assert float(state.coefficient) == pytest.approx(1e-8, rel=1e-6)  # pure: input unchanged
    assert isinstance(grown, ReLURoutingState)


def test_adaptive_coefficient_reaches_the_target_sparsity():
    # A toy closed loop: the L1 pull lowers every logit by the coefficient; starting dense,
    # the coefficient must grow until about k of E gates stay positive, then hover there.
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((512, E)).astype(np.float32) + 1.0
    state, target = relu_state_init(1e-3, xp=np), 1 - 2 / E
    history = []
    for _ in range(120):
        routing = mr.ReLURouting(E, max_k=E)(logits - state.coefficient)
        sparsity = mr.losses.relu_sparsity(routing)
        history.append(float(sparsity))
        state = update_l1_coefficient(state, sparsity, target_sparsity=target)
    assert history[0] < 0.3  # dense at the start
    assert abs(np.mean(history[-40:]) - target) < 0.05


def test_jax_jit():
    logits = edge_case_logits(2, 16, E, seed=14)
    same_routing(*jax_jitted(mr.ReLURouting(E, max_k=3, capacity_factor=1.0), logits))
    jax = pytest.importorskip("jax")
    state = relu_state_init(1.0, xp=jax.numpy)
    step = jax.jit(lambda s, x: update_l1_coefficient(s, x, target_sparsity=0.5))
    assert float(step(state, jax.numpy.asarray(0.1)).coefficient) == pytest.approx(1.2)


@COMPILE_WARNING
def test_torch_compile():
    logits = edge_case_logits(2, 16, E, seed=14)
    same_routing(*torch_compiled(mr.ReLURouting(E, max_k=3, capacity_factor=1.0), logits))


def test_gradients_flow_through_the_gates():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(15).standard_normal((6, E)).astype(np.float32)
    logits = torch.tensor(values, requires_grad=True)
    routing = mr.ReLURouting(E, max_k=E)(logits)
    (routing.weights.sum() + mr.losses.relu_l1_loss(routing, target_k=2)).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    # Negative logits get no gradient (ReLU), positive ones do.
    assert torch.all(grad[logits.detach() < 0] == 0) and torch.all(grad[logits.detach() > 0] > 0)


BAD = [
    pytest.param({"max_k": 0}, ValueError, "max_k must", id="max_k-0"),
    pytest.param({"max_k": E + 1}, ValueError, "max_k must", id="max_k-above-E"),
    pytest.param({"max_k": None}, TypeError, "max_k must", id="max_k-None"),
    pytest.param({"max_k": 2, "capacity_factor": -1.0}, ValueError, "capacity_factor", id="cf"),
    pytest.param({"max_k": 2, "drop_policy": "x"}, ValueError, "drop_policy", id="drop_policy"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD)
def test_bad_parameters_are_named(options, error, match):
    with pytest.raises(error, match=match):
        mr.ReLURouting(E, **options)


def test_bad_state_arguments_are_named():
    state = relu_state_init(xp=np)
    with pytest.raises(ValueError, match="target_sparsity"):
        update_l1_coefficient(state, np.asarray(0.5), target_sparsity=1.0)
    with pytest.raises(ValueError, match="multiplier"):
        update_l1_coefficient(state, np.asarray(0.5), target_sparsity=0.5, multiplier=1.0)
    with pytest.raises(TypeError, match="state"):
        update_l1_coefficient(1e-8, np.asarray(0.5), target_sparsity=0.5)
    with pytest.raises(TypeError, match="sparsity"):
        update_l1_coefficient(state, 0.5, target_sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        update_l1_coefficient(state, np.zeros(3), target_sparsity=0.5)
    with pytest.raises(ValueError, match="coefficient"):
        relu_state_init(0.0, xp=np)
    with pytest.raises(ValueError, match="target_k"):
        mr.losses.relu_l1_loss(mr.ReLURouting(E, 2)(np.zeros((2, E), np.float32)), target_k=E + 1)
    with pytest.raises(ValueError, match="columns"):
        mr.ReLURouting(E, 2)(np.zeros((2, E - 1), np.float32))


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_zero_tokens(backend):
    routing = mr.ReLURouting(E, max_k=3)(backend.asarray(np.zeros((0, E), np.float32)))
    assert routing.num_tokens == 0 and to_numpy(routing.expert_ids).shape == (0,)
    assert float(mr.losses.relu_l1_loss(routing, target_k=2)) == 0.0
    assert float(mr.losses.relu_sparsity(routing)) == 0.0  # no valid cell: 0.0, as every stat


def test_torch_meta_device():
    torch = pytest.importorskip("torch")
    assert_on_meta(mr.ReLURouting(E, max_k=3)(torch.empty(5, E, device="meta")))


def test_state_on_torch_meta():
    torch = pytest.importorskip("torch")
    state = relu_state_init(xp=torch, device=torch.device("meta"))
    state = update_l1_coefficient(state, torch.empty((), device="meta"), target_sparsity=0.5)
    assert state.coefficient.device.type == "meta"
