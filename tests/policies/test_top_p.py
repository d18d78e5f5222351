"""TopP (Huang et al. 2024): references, every backend, properties, tracing, errors, devices."""

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
from moerouter.testing import (
    assert_close,
    assert_routing_equal,
    edge_case_logits,
    reference_entropy,
    to_numpy,
)
from moerouter.testing.reference.adaptive import reference_routed_load_balancing, reference_top_p

E = 8

OPTIONS = [
    # The paper's setting: raw probabilities, p = 0.4.
    pytest.param({"p": 0.4, "max_k": 4}, id="paper-p0.4"),
    # A high p reaches the max_k cap on flat rows.
    pytest.param({"p": 0.9, "max_k": 3}, id="cap-reached"),
    # p = 0 is top-1; p = 1 takes max_k experts.
    pytest.param({"p": 0.0, "max_k": 4}, id="p0"),
    pytest.param({"p": 1.0, "max_k": 5}, id="p1"),
    # Renormalised weights (not the paper's): a softmax over the kept logits.
    pytest.param({"p": 0.6, "max_k": E, "normalize": True}, id="normalize-max_k-E"),
    # Capacity drops, k-major then token order / descending probability.
    pytest.param({"p": 0.7, "max_k": 3, "capacity_factor": 0.5}, id="capacity-position"),
    pytest.param(
        {"p": 0.7, "max_k": 3, "capacity_factor": 0.5, "drop_policy": "probs"}, id="capacity-probs"
    ),
]


def reference_of(logits, options):
    return reference_top_p(logits, **options)


@pytest.mark.parametrize("options", OPTIONS)
def test_reference_on_every_backend(backend, options):
    # Edge rows: -inf entries, NaN, +inf, all -inf, ties inside a row and between tokens.
    logits = edge_case_logits(2, 16, E, seed=3)
    routing = mr.TopP(E, **options)(backend.asarray(logits))
    assert_routing_equal(routing, reference_of(logits, options))


@pytest.mark.parametrize("options", OPTIONS)
def test_backends_give_identical_integers(backend, options):
    # Every backend against NumPy: the same decision, not only the same as the reference.
    logits = np.random.default_rng(5).standard_normal((3, 32, E)).astype(np.float32) * 2
    expected = mr.TopP(E, **options)(logits)
    same_routing(mr.TopP(E, **options)(backend.asarray(logits)), expected)


def test_paper_example_and_the_authors_equality_rule():
    # Probabilities 0.5, 0.3, 0.2: p = 0.5 is reached by the first expert alone (the paper's
    # "reaches"); the authors' code (mass must *exceed* p) would also take the second.
    logits = np.log(np.asarray([[0.5, 0.3, 0.2]], np.float64)).astype(np.float32)
    routing = mr.TopP(3, p=0.5, max_k=3)(logits)
    assert np.asarray(routing.expert_ids).tolist()[0] == 0
    assert int(np.sum(np.asarray(routing.expert_ids) >= 0)) in (1, 2)  # float32 rounding of 0.5
    routing = mr.TopP(3, p=0.79, max_k=3)(logits)
    assert np.asarray(routing.expert_ids).tolist() == [0, 1, -1]
    assert_close(np.asarray(routing.weights), np.asarray([0.5, 0.3, 0.0]), "raw weights")


@st.composite
def small_integer_logits(draw):
    groups, tokens, experts = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 6)),
    )
    entries = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, -math.inf])
    flat = draw(
        st.lists(entries, min_size=groups * tokens * experts, max_size=groups * tokens * experts)
    )
    logits = np.asarray(flat, np.float32).reshape(groups, tokens, experts)
    return logits, experts, draw(st.integers(1, experts))


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
@PROPERTY
@given(case=small_integer_logits(), p=st.sampled_from([0.0, 0.3, 0.5, 0.77, 1.0]))
def test_properties(backend, case, p):
    # Small integer logits: ties inside rows and between tokens are the rule.
    logits, experts, max_k = case
    routing = mr.TopP(experts, p=p, max_k=max_k)(backend.asarray(logits))
    assert_routing_equal(routing, reference_top_p(logits, p, max_k))
    ids = to_numpy(routing.expert_ids).reshape(-1, max_k)
    choice = to_numpy(routing.choice_ids).reshape(-1, max_k)
    flat = logits.reshape(-1, experts)
    finite = to_numpy(routing.finite_rows)
    used = ids >= 0
    # Used slots come first: top-p never skips an expert to take a worse one.
    assert np.all(used[:, :-1] | ~used[:, 1:])
    for t in range(flat.shape[0]):
        if not finite[t]:
            assert not used[t].any()
            continue
        finite_entries = int(np.sum(flat[t] > -np.inf))
        if p == 0.0:  # top-1
            assert used[t].sum() == 1
        if p == 1.0:  # every finite column up to max_k
            assert used[t].sum() == min(max_k, finite_entries)
        # Slots in descending logit order, ties to the lower expert.
        row = flat[t][choice[t]]
        assert np.all(row[:-1] >= row[1:])
        for a, b in zip(choice[t][:-1], choice[t][1:], strict=True):
            assert flat[t][a] > flat[t][b] or a < b


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
@PROPERTY
@given(case=small_integer_logits(), ps=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_more_p_never_fewer_experts(backend, case, ps):
    logits, experts, max_k = case
    low, high = sorted(ps)
    small = to_numpy(mr.TopP(experts, p=low, max_k=max_k)(backend.asarray(logits)).expert_ids)
    large = to_numpy(mr.TopP(experts, p=high, max_k=max_k)(backend.asarray(logits)).expert_ids)
    # The slots kept at the lower p are kept, to the same experts, at the higher p.
    assert np.all((small < 0) | (small == large))


TRACED = mr.TopP(E, p=0.5, max_k=3, capacity_factor=1.0)


def test_jax_jit():
    same_routing(*jax_jitted(TRACED, edge_case_logits(2, 16, E, seed=4)))


@COMPILE_WARNING
def test_torch_compile():
    same_routing(*torch_compiled(TRACED, edge_case_logits(2, 16, E, seed=4)))


def test_losses_against_references(backend):
    logits = edge_case_logits(1, 16, E, seed=6)
    routing = mr.TopP(E, p=0.6, max_k=4)(backend.asarray(logits))
    assert_close(
        to_numpy(mr.losses.dynamic_loss(routing)),
        np.asarray(reference_entropy(routing)),
        "dynamic_loss",
    )
    assert_close(
        to_numpy(mr.losses.routed_load_balancing(routing)),
        np.asarray(reference_routed_load_balancing(routing)),
        "routed_load_balancing",
    )


def test_routed_load_balancing_is_one_at_uniform_routing():
    # Every expert gets the same share and the same mean probability.
    logits = np.zeros((E, E), np.float32)
    logits[np.arange(E), np.arange(E)] = 3.0
    routing = mr.TopP(E, p=0.2, max_k=2)(logits)
    assert float(mr.losses.routed_load_balancing(routing)) == pytest.approx(1.0, rel=1e-6)


def test_gradients_reach_the_logits():
    torch = pytest.importorskip("torch")
    logits = torch.tensor(edge_case_logits(1, 16, E, seed=7)[0][:6], requires_grad=True)
    routing = mr.TopP(E, p=0.5, max_k=3)(logits)
    (routing.weights.sum() + mr.losses.dynamic_loss(routing)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


BAD = [
    # p outside [0, 1], or not a number: the error names p.
    pytest.param({"p": 1.5, "max_k": 2}, ValueError, "p must", id="p-above-1"),
    pytest.param({"p": -0.1, "max_k": 2}, ValueError, "p must", id="p-negative"),
    pytest.param({"p": float("nan"), "max_k": 2}, ValueError, "p must", id="p-nan"),
    pytest.param({"p": "0.5", "max_k": 2}, TypeError, "p must", id="p-string"),
    # max_k outside [1, E], or not an int.
    pytest.param({"p": 0.5, "max_k": 0}, ValueError, "max_k must", id="max_k-0"),
    pytest.param({"p": 0.5, "max_k": E + 1}, ValueError, "max_k must", id="max_k-above-E"),
    pytest.param({"p": 0.5, "max_k": 2.0}, TypeError, "max_k must", id="max_k-float"),
    pytest.param(
        {"p": 0.5, "max_k": 2, "capacity_factor": 0}, ValueError, "capacity_factor", id="cf-0"
    ),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD)
def test_bad_parameters_are_named(options, error, match):
    with pytest.raises(error, match=match):
        mr.TopP(E, **options)


def test_bad_logits_are_named():
    router = mr.TopP(E, p=0.5, max_k=2)
    with pytest.raises(ValueError, match="columns"):
        router(np.zeros((3, E + 1), np.float32))
    with pytest.raises(TypeError, match="floating"):
        router(np.zeros((3, E), np.int32))
    with pytest.raises(ValueError, match="shape"):
        router(np.zeros((E,), np.float32))
    with pytest.raises(ValueError, match="p must"):
        router(np.zeros((3, E), np.float32), p=2.0)
    with pytest.raises(ValueError, match="non-finite"):
        mr.TopP(E, p=0.5, max_k=2, strict=True)(np.full((2, E), np.nan, np.float32))


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_zero_tokens(backend):
    routing = mr.TopP(E, p=0.5, max_k=3)(backend.asarray(np.zeros((0, E), np.float32)))
    assert routing.num_tokens == 0 and to_numpy(routing.expert_ids).shape == (0,)
    assert float(mr.losses.dynamic_loss(routing)) == 0.0


def test_torch_meta_device():
    torch = pytest.importorskip("torch")
    assert_on_meta(mr.TopP(E, p=0.5, max_k=3)(torch.empty(5, E, device="meta")))


def test_per_call_p_equals_a_new_router():
    logits = edge_case_logits(1, 12, E, seed=8)
    same_routing(mr.TopP(E, p=0.2, max_k=4)(logits, p=0.8), mr.TopP(E, p=0.8, max_k=4)(logits))
