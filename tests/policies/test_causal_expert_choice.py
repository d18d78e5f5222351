"""CausalExpertChoice: training = batch expert choice, causal inference by thresholds or a
predictor; references, every backend, properties, state, tracing, errors, devices."""

from __future__ import annotations

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
from moerouter.policies import expert_choice_targets, threshold_state_init, update_thresholds
from moerouter.testing import (
    assert_close,
    assert_routing_equal,
    edge_case_logits,
    reference_expert_choice,
    to_numpy,
)
from moerouter.testing.reference.adaptive import reference_causal_expert_choice

E = 8
RNG = np.random.default_rng(21)
THRESHOLDS = RNG.uniform(0.05, 0.4, E).astype(np.float32)


def test_training_is_batch_expert_choice(backend):
    # The training rule is ExpertChoice itself: same decision, same layout.
    logits = edge_case_logits(2, 16, E, seed=22)
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    routing = router(backend.asarray(logits), training=True)
    assert_routing_equal(routing, reference_expert_choice(logits, 2.0))
    assert router.capacity(16) == mr.ExpertChoice(E, 2.0).capacity(16)


def test_threshold_mode_on_every_backend(backend):
    logits = edge_case_logits(2, 16, E, seed=23)
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    routing = router(backend.asarray(logits), backend.asarray(THRESHOLDS))
    assert_routing_equal(routing, reference_causal_expert_choice(logits, thresholds=THRESHOLDS))


def test_predictor_mode_on_every_backend(backend):
    logits = edge_case_logits(2, 16, E, seed=24)
    predicted = RNG.standard_normal(logits.shape).astype(np.float32)
    router = mr.CausalExpertChoice(E, capacity_factor=2.0, mode="predictor")
    routing = router(backend.asarray(logits), predictor_logits=backend.asarray(predicted))
    assert_routing_equal(
        routing, reference_causal_expert_choice(logits, predictor_logits=predicted)
    )


def test_backends_give_identical_integers(backend):
    logits = RNG.standard_normal((3, 32, E)).astype(np.float32)
    router = mr.CausalExpertChoice(E, capacity_factor=1.5)
    expected = router(logits, THRESHOLDS)
    same_routing(router(backend.asarray(logits), backend.asarray(THRESHOLDS)), expected)
    state = update_thresholds(threshold_state_init(E, xp=np), router(logits, training=True))
    xp = backend.namespace()
    other = update_thresholds(
        threshold_state_init(E, xp=xp), router(backend.asarray(logits), training=True)
    )
    assert_close(to_numpy(other.thresholds), state.thresholds, "thresholds")


def test_thresholds_reproduce_the_batch_decision_on_the_batch_they_came_from():
    # One group, momentum irrelevant: tau_e is the C-th largest probability of that group, so
    # P >= tau_e takes exactly the top-C tokens (no ties at random logits).
    logits = RNG.standard_normal((1, 64, E)).astype(np.float32)
    router = mr.CausalExpertChoice(E, capacity_factor=1.0)
    batch = router(logits, training=True)
    state = update_thresholds(threshold_state_init(E, xp=np), batch)
    causal = router(logits, state.thresholds)
    assert np.array_equal(
        expert_choice_targets(batch), expert_choice_targets_of_token_layout(causal)
    )


def expert_choice_targets_of_token_layout(routing):
    taken = np.zeros((routing.num_tokens, routing.num_experts), np.float32)
    ids = to_numpy(routing.expert_ids)
    tokens = to_numpy(routing.token_ids)
    taken[tokens[ids >= 0], ids[ids >= 0]] = 1.0
    return taken


def test_update_is_a_moving_average_started_at_the_first_batch():
    router = mr.CausalExpertChoice(E, capacity_factor=1.0)
    a = router(RNG.standard_normal((2, 16, E)).astype(np.float32), training=True)
    b = router(RNG.standard_normal((2, 16, E)).astype(np.float32), training=True)

    def cth(routing):  # the C-th largest probability per expert, mean over groups
        return to_numpy(routing.weights).reshape(2, E, -1)[:, :, -1].mean(axis=0)

    state = threshold_state_init(E, xp=np)
    one = update_thresholds(state, a, momentum=0.9)
    two = update_thresholds(one, b, momentum=0.9)
    assert np.all(np.isinf(state.thresholds))  # pure: the input is unchanged
    assert_close(one.thresholds, cth(a), "first update")
    assert_close(two.thresholds, 0.9 * cth(a) + 0.1 * cth(b), "second update")
    assert int(two.updates) == 4


@st.composite
def small_logits(draw):
    groups, tokens = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    experts = draw(st.integers(1, 5))
    size = groups * tokens * experts
    entries = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, -np.inf])
    logits = np.asarray(draw(st.lists(entries, min_size=size, max_size=size)), np.float32)
    return logits.reshape(groups, tokens, experts), experts


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
@PROPERTY
@given(
    case=small_logits(),
    level=st.sampled_from([0.0, 0.2, 0.5, 1.0, np.inf]),
    seen=st.booleans(),
)
def test_threshold_properties(backend, case, level, seen):
    # Integer logits: ties inside rows and between tokens; thresholds of 0, 1, +inf and a
    # never-updated state (all +inf).
    logits, experts = case
    router = mr.CausalExpertChoice(experts, capacity_factor=1.0)
    if seen:
        thresholds = np.full(experts, level, np.float32)
    else:
        thresholds = to_numpy(threshold_state_init(experts, xp=np).thresholds)
    routing = router(backend.asarray(logits), backend.asarray(thresholds))
    assert_routing_equal(routing, reference_causal_expert_choice(logits, thresholds=thresholds))
    ids = to_numpy(routing.expert_ids)
    if not seen or level == np.inf:  # thresholds never seen: no expert takes any token
        assert np.all(ids == -1)
    # Causal: the first token alone routes as it does within the batch.
    alone = router(backend.asarray(logits[:1, :1]), backend.asarray(thresholds))
    assert np.array_equal(to_numpy(alone.expert_ids), ids[:experts])


def test_predictor_loss_against_a_loop():
    logits = edge_case_logits(1, 16, E, seed=25)
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    routing = router(logits, training=True)
    z = RNG.standard_normal((16, E)).astype(np.float32) * 3
    y = to_numpy(expert_choice_targets(routing))
    finite = to_numpy(routing.finite_rows)
    zz = z[finite].astype(np.float64)
    want = np.mean(np.logaddexp(0.0, zz) - zz * y[finite])
    assert_close(to_numpy(mr.losses.causal_predictor_loss(z, routing)), np.asarray(want), "bce")


def test_predictor_loss_gradient_is_finite_and_trains_the_predictor_only():
    torch = pytest.importorskip("torch")
    logits = torch.tensor(RNG.standard_normal((16, E)).astype(np.float32), requires_grad=True)
    z = torch.tensor(RNG.standard_normal((16, E)).astype(np.float32) * 50, requires_grad=True)
    routing = mr.CausalExpertChoice(E, capacity_factor=2.0)(logits, training=True)
    mr.losses.causal_predictor_loss(z, routing).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert logits.grad is None  # the labels carry no gradient


def test_jax_jit():
    logits = edge_case_logits(2, 16, E, seed=26)
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    same_routing(*jax_jitted(router, logits, THRESHOLDS))
    same_routing(*jax_jitted(lambda x: router(x, training=True), logits))
    jax = pytest.importorskip("jax")
    step = jax.jit(lambda s, x: update_thresholds(s, router(x, training=True)))
    state = step(threshold_state_init(E, xp=jax.numpy), jax.numpy.asarray(logits))
    assert bool(jax.numpy.all(jax.numpy.isfinite(state.thresholds)))


@COMPILE_WARNING
def test_torch_compile():
    logits = edge_case_logits(2, 16, E, seed=26)
    router = mr.CausalExpertChoice(E, capacity_factor=2.0, mode="predictor")
    predicted = RNG.standard_normal(logits.shape).astype(np.float32)
    same_routing(*torch_compiled(lambda x, z: router(x, predictor_logits=z), logits, predicted))


def test_torch_state_keeps_no_autograd_history():
    torch = pytest.importorskip("torch")
    logits = torch.tensor(RNG.standard_normal((16, E)).astype(np.float32), requires_grad=True)
    routing = mr.CausalExpertChoice(E, 2.0)(logits, training=True)
    state = update_thresholds(threshold_state_init(E, xp=torch), routing)
    assert not state.thresholds.requires_grad


def test_bad_inputs_are_named():
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    logits = np.zeros((4, E), np.float32)
    with pytest.raises(ValueError, match="mode"):
        mr.CausalExpertChoice(E, 2.0, mode="oracle")
    with pytest.raises(ValueError, match="capacity_factor"):
        mr.CausalExpertChoice(E, 0.0)
    with pytest.raises(TypeError, match="capacity_factor"):
        mr.CausalExpertChoice(E, None)
    with pytest.raises(ValueError, match="needs thresholds"):
        router(logits)
    with pytest.raises(ValueError, match="thresholds must have shape"):
        router(logits, np.zeros(E + 1, np.float32))
    with pytest.raises(TypeError, match="thresholds must be a real floating"):
        router(logits, np.zeros(E, np.int32))
    with pytest.raises(ValueError, match="not predictor_logits"):
        router(logits, THRESHOLDS, predictor_logits=logits)
    with pytest.raises(ValueError, match="neither"):
        router(logits, THRESHOLDS, training=True)
    predictor = mr.CausalExpertChoice(E, 2.0, mode="predictor")
    with pytest.raises(ValueError, match="predictor_logits must have"):
        predictor(logits, predictor_logits=np.zeros((3, E), np.float32))
    with pytest.raises(ValueError, match="momentum"):
        update_thresholds(threshold_state_init(E, xp=np), router(logits, training=True), momentum=1)
    with pytest.raises(TypeError, match="expert-layout"):
        update_thresholds(threshold_state_init(E, xp=np), router(logits, THRESHOLDS))
    with pytest.raises(ValueError, match="experts"):
        update_thresholds(threshold_state_init(E - 1, xp=np), router(logits, training=True))
    with pytest.raises(ValueError, match="predictor_logits hold"):
        mr.losses.causal_predictor_loss(np.zeros((3, E), np.float32), router(logits, training=True))


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_zero_tokens(backend):
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    routing = router(backend.asarray(np.zeros((0, E), np.float32)), backend.asarray(THRESHOLDS))
    assert routing.num_tokens == 0 and to_numpy(routing.expert_ids).shape == (0,)


def test_torch_meta_device():
    torch = pytest.importorskip("torch")
    router = mr.CausalExpertChoice(E, capacity_factor=2.0)
    assert_on_meta(router(torch.empty(5, E, device="meta"), torch.empty(E, device="meta")))


def test_state_and_targets_on_torch_meta():
    torch = pytest.importorskip("torch")
    state = threshold_state_init(E, xp=torch, device=torch.device("meta"))
    assert state.thresholds.device.type == "meta" and state.updates.device.type == "meta"
