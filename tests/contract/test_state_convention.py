"""One state convention: a NamedTuple of arrays, an ``init`` and a pure ``update`` per piece.

Every stateful piece (global-batch balancing, the DeepSeek expert bias, a MoE layer's state,
ReLU routing's L1 coefficient, causal expert choice's thresholds, MC-SMoE's routing statistics)
is checked against the convention; the new state-type forms give the results of the old ones.
"""

import math

import array_api_strict
import numpy as np
import pytest

import moerouter as mr
from moerouter.policies._expert_bias import route_with_expert_bias

E = 4


def _logits(seed=0, tokens=12, columns=E):
    return np.random.default_rng(seed).standard_normal((tokens, columns)).astype(np.float32)


def _states(xp):
    """(name, init state, one update of it) for every stateful piece."""
    routing = mr.TopK(num_experts=E, k=2)(xp.asarray(_logits()))
    causal = mr.CausalExpertChoice(num_experts=E, capacity_factor=1.0)
    training = causal(xp.asarray(_logits()[None, ...]), training=True)
    relu = mr.policies.relu_state_init(xp=xp)
    return [
        (
            "balance",
            mr.losses.balance_state_init(E, xp=xp),
            lambda s: mr.losses.accumulate(s, routing),
        ),
        (
            "expert_bias",
            mr.expert_bias_init(E, xp=xp),
            lambda s: mr.update_expert_bias(s, xp.asarray([3, 1, 0, 2]), 0.1),
        ),
        (
            "moe",
            mr.losses.moe_state_init(E, xp=xp),
            lambda s: mr.losses.moe_state_update(s, routing, bias_update_rate=0.1),
        ),
        (
            "relu",
            relu,
            lambda s: mr.policies.update_l1_coefficient(s, xp.asarray(0.2), target_sparsity=0.5),
        ),
        (
            "thresholds",
            mr.policies.threshold_state_init(E, xp=xp),
            lambda s: mr.policies.update_thresholds(s, training),
        ),
        (
            "routing_statistics",
            mr.merging.routing_statistics_init(E, xp=xp),
            lambda s: mr.merging.collect_routing_statistics(routing, state=s),
        ),
    ]


def _leaves(state):
    if isinstance(state, tuple):
        return [leaf for item in state for leaf in _leaves(item)]
    return [state]


@pytest.mark.parametrize("xp", [np, array_api_strict], ids=["numpy", "array_api_strict"])
def test_every_state_is_a_named_tuple_of_arrays_updated_purely(xp):
    for name, state, update in _states(xp):
        assert isinstance(state, tuple) and hasattr(state, "_fields"), name
        new = update(state)
        assert type(new) is type(state), name
        for before, leaf in zip(_leaves(state), _leaves(new), strict=True):
            assert hasattr(leaf, "__array_namespace__") or isinstance(leaf, np.ndarray), name
            assert leaf.shape == before.shape and leaf.dtype == before.dtype, name
        # Pure: the old state still holds the init values (a second update gives the same).
        for first, second in zip(_leaves(new), _leaves(update(state)), strict=True):
            np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_expert_bias_state_gives_the_bare_array_results():
    counts = np.asarray([5, 1, 3, 3])
    bare = mr.update_expert_bias(np.zeros(E, np.float32), counts, 0.1)
    state = mr.update_expert_bias(mr.expert_bias_init(E, xp=np), counts, 0.1)
    assert isinstance(state, mr.ExpertBiasState)
    np.testing.assert_array_equal(state.bias, bare)
    layers = mr.expert_bias_init(E, num_layers=3, xp=np)
    assert layers.bias.shape == (3, E) and layers.bias.dtype == np.float32
    stepped = mr.update_expert_bias(layers, np.tile(counts, (3, 1)), 0.1)
    np.testing.assert_array_equal(stepped.bias, np.tile(bare, (3, 1)))


def test_deepseek_routes_the_same_with_a_state_or_its_array():
    router = mr.DeepSeekTopK(num_experts=E, k=1, num_groups=2, topk_groups=1)
    logits = _logits(1)
    state = mr.ExpertBiasState(np.asarray([0.5, -0.5, 0.0, 0.2], np.float32))
    with_state, with_array = router(logits, state), router(logits, state.bias)
    for field in ("expert_ids", "weights", "probs"):
        np.testing.assert_array_equal(getattr(with_state, field), getattr(with_array, field))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: mr.expert_bias_init(0, xp=np), ValueError, "num_experts"),
        (lambda: mr.expert_bias_init(E, num_layers=0, xp=np), ValueError, "num_layers"),
        (lambda: mr.expert_bias_init(E, xp=None), TypeError, "namespace"),
        (lambda: mr.merging.routing_statistics_init(0, xp=np), ValueError, "num_experts"),
        (lambda: mr.losses.moe_state_init(E, E - 1, xp=np), ValueError, "num_choices"),
        (lambda: mr.losses.moe_state_init(E, xp="numpy"), TypeError, "namespace"),
        (
            lambda: mr.losses.moe_state_update(
                mr.losses.balance_state_init(E, xp=np), mr.TopK(E, 1)(_logits())
            ),
            TypeError,
            "MoEState",
        ),
        (
            lambda: mr.update_expert_bias(
                mr.expert_bias_init(E, xp=np), np.asarray([1, 2, 3, -1]), 0.1
            ),
            ValueError,
            "tokens_per_expert",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_routing_statistics_is_a_named_tuple_that_keeps_its_old_constructor():
    logits = _logits(2)
    routing = mr.TopK(num_experts=E, k=2)(logits)
    fresh = mr.merging.collect_routing_statistics(routing, logits)
    from_init = mr.merging.collect_routing_statistics(
        routing, logits, state=mr.merging.routing_statistics_init(E, xp=np)
    )
    for got, want in zip(from_init, fresh, strict=True):
        np.testing.assert_array_equal(got, want)
    assert fresh.num_experts == E and fresh._fields == ("usage", "logit_gram", "num_tokens")
    old_form = mr.merging.RoutingStatistics(fresh.usage, fresh.logit_gram, fresh.num_tokens, E)
    assert old_form.num_experts == E
    np.testing.assert_array_equal(
        mr.merging.expert_similarity(old_form), mr.merging.expert_similarity(fresh)
    )
    with pytest.raises(ValueError, match="num_experts"):
        mr.merging.RoutingStatistics(fresh.usage, fresh.logit_gram, fresh.num_tokens, E + 1)


def test_moe_state_update_is_accumulate_and_the_bias_update_of_served_counts():
    router = mr.TopK(num_experts=E, k=2, capacity_factor=0.5)  # drops: served < chosen
    state = mr.losses.moe_state_init(E, xp=np)
    balance, bias = mr.losses.balance_state_init(E, xp=np), np.zeros(E, np.float32)
    for seed in range(3):
        routing = router(_logits(seed))
        state = mr.losses.moe_state_update(state, routing, bias_update_rate=0.01)
        balance = mr.losses.accumulate(balance, routing)
        ids = np.asarray(routing.expert_ids)
        served = np.bincount(ids[ids >= 0], minlength=E).astype(np.float32)
        bias = mr.update_expert_bias(bias, served, 0.01)
    np.testing.assert_array_equal(state.expert_bias, bias)
    for got, want in zip(state.balance, balance, strict=True):
        np.testing.assert_array_equal(got, want)


def test_moe_state_with_null_experts_counts_every_column_and_biases_the_real_ones():
    state = mr.losses.moe_state_init(E, E + 2, xp=np)
    assert state.expert_bias.shape == (E,) and state.balance.counts.shape == (E + 2,)
    routing = mr.NullExperts(num_experts=E, num_null=2, k=2)(_logits(3, columns=E + 2))
    new = mr.losses.moe_state_update(state, routing, bias_update_rate=0.1)
    assert int(new.balance.tokens) == 12 and int(new.balance.counts.sum()) == 24


def test_zero_tokens_leave_the_state_as_it_was():
    routing = mr.TopK(num_experts=E, k=2)(np.zeros((0, E), np.float32))
    state = mr.losses.moe_state_init(E, xp=np)
    new = mr.losses.moe_state_update(state, routing, bias_update_rate=0.1)
    for got, want in zip(_leaves(new), _leaves(state), strict=True):
        np.testing.assert_array_equal(got, want)
    statistics = mr.merging.collect_routing_statistics(
        routing, state=mr.merging.routing_statistics_init(E, xp=np)
    )
    assert float(statistics.num_tokens) == 0.0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_with_expert_bias_selects_on_the_biased_logits_and_weighs_unbiased(score):
    router = mr.TopK(num_experts=E, k=2, score=score)
    logits = _logits(4)
    bias = np.asarray([1.0, -1.0, 0.5, 0.0], np.float32)
    routing = route_with_expert_bias(router, logits, bias)
    np.testing.assert_array_equal(routing.expert_ids, router(logits + bias).expert_ids)
    np.testing.assert_array_equal(routing.probs, router(logits).probs)
    chosen = np.take_along_axis(router(logits).probs, routing.expert_ids.reshape(-1, 2), axis=-1)
    want = chosen / chosen.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(routing.weights.reshape(-1, 2), want, rtol=1e-6)
    assert math.isclose(float(routing.weights.sum()), 12.0, rel_tol=1e-5)
    with pytest.raises(TypeError, match="TopK"):
        route_with_expert_bias(mr.ExpertChoice(E, capacity_factor=1.0), logits, bias)
    with pytest.raises(ValueError, match="expert_bias"):
        route_with_expert_bias(router, logits, bias[:2])


def test_states_are_pytrees_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    for name, state, update in _states(jnp):
        jitted = jax.jit(update)(state)
        eager = update(state)
        assert type(jitted) is type(eager), name
        for got, want in zip(_leaves(jitted), _leaves(eager), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, err_msg=name)
