"""The functional MoE layer: gradients through router, dispatch, experts and combine against a
float64 loop reference (by finite differences), jit/grad/vmap, and the explicit balancing state."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moerouter_jax import expert_mlp, init_balance_state, moe_apply, moe_init
from moerouter_jax.layer import reset_accumulation, route

import moerouter as mr
from moerouter.testing import assert_close, to_numpy

T, D, H, E = 8, 3, 4, 4


def randn(*shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def gelu(v):
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def reference_loss(logits, x, w_in, w_out, probe, assignments, expert_layout):
    """float64, one assignment at a time, with the routing decision held fixed.

    ``assignments`` lists (token, expert, column set the weight normalises over): the weight is
    the softmax of the token's logits over that set, at the expert's column.
    """
    y = np.zeros((T, D))
    for token, expert, columns in assignments:
        row = logits[token]
        exp = {c: math.exp(row[c] - max(row[list(columns)])) for c in columns}
        weight = exp[expert] / sum(exp.values())
        hidden = np.array([gelu(v) for v in x[token] @ w_in[expert]])
        y[token] += weight * (hidden @ w_out[expert])
    return float(np.sum(y * probe))


def assignments_of(routing):
    token_ids = to_numpy(routing.token_ids).tolist()
    expert_ids = to_numpy(routing.expert_ids).tolist()
    if routing.layout == "expert":  # expert choice: weights are the full softmax
        return [
            (t, e, tuple(range(E))) for t, e in zip(token_ids, expert_ids, strict=True) if e >= 0
        ]
    slots = routing.slots
    out = []
    for t in range(T):
        mine = [e for e in expert_ids[t * slots : (t + 1) * slots] if e >= 0]
        out.extend((t, e, tuple(mine)) for e in mine)  # renormalised over the routed ones
    return out


def finite_differences(function, arrays, step=1e-6):
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            shifted = [a.copy() for a in arrays]
            shifted[index][position] += step
            up = function(*shifted)
            shifted[index][position] -= 2 * step
            grads[len(grads) :] = []
            grad[position] = (up - function(*shifted)) / (2 * step)
        grads.append(grad)
    return grads


ROUTERS = [
    pytest.param(mr.TopK(num_experts=E, k=2), E, id="topk"),  # renormalised softmax weights
    # Null experts: tokens with fewer real experts, rows past num_valid.
    pytest.param(mr.NullExperts(num_experts=E, num_null=2, k=2), E + 2, id="null-experts"),
    # Expert choice: expert layout, variable fan-in, full-softmax weights.
    pytest.param(mr.ExpertChoice(num_experts=E, capacity_factor=1.0), E, id="expert-choice"),
]


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gradient_matches_float64_reference_finite_differences(router, columns):
    logits = randn(T, columns, seed=0, scale=0.5)
    x, probe = randn(T, D, seed=1), randn(T, D, seed=2)
    w_in, w_out = randn(E, D, H, seed=3, scale=0.5), randn(E, H, D, seed=4, scale=0.5)

    def loss(logits, x, w_in, w_out):
        plan = mr.make_plan(router(logits))
        xe = mr.dispatch(x, plan)
        ye = expert_mlp(w_in, w_out, xe, plan.group_sizes, activation="gelu")
        return jnp.sum(mr.combine(ye, plan) * probe)

    args = tuple(jnp.asarray(a) for a in (logits, x, w_in, w_out))
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    assignments = assignments_of(router(args[0]))

    def reference(*arrays):
        return reference_loss(*arrays, probe.astype(np.float64), assignments, False)

    float64 = [a.astype(np.float64) for a in (logits, x, w_in, w_out)]
    assert_close(value, reference(*float64), "loss", rtol=1e-5, atol=1e-5)
    for name, got, want in zip(
        ("logits", "x", "w_in", "w_out"), grads, finite_differences(reference, float64), strict=True
    ):
        assert_close(got, want, f"grad {name}", rtol=1e-4, atol=1e-5)
    if columns > E:  # null logits get no gradient from the task output (AdaMoE)
        assert np.all(to_numpy(grads[0])[:, E:] == 0)


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_layer_kernels_equal_agnostic_path_under_jit_grad(use_backend, router, columns):
    params = moe_init(jax.random.key(0), hidden_size=6, intermediate_size=5, router=router)
    x = jnp.asarray(randn(10, 6, seed=5))

    def loss(params, x):
        y, losses = moe_apply(params, x, router=router, implementation="ragged_dot")
        return jnp.sum(y**2) + losses["load_balancing"] + losses["z_loss"]

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, grads = step(params, x)
    use_backend("reference")
    want_value, want_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert_close(value, want_value, "loss", rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(got, want, "grad", rtol=1e-4, atol=1e-5)


def test_layer_vmaps_over_groups_with_shared_expert():
    router = mr.TopK(num_experts=E, k=2)
    params = moe_init(
        jax.random.key(1),
        hidden_size=6,
        intermediate_size=5,
        router=router,
        shared_intermediate_size=3,
        activation="silu",
    )
    apply = jax.jit(functools.partial(moe_apply, router=router, activation="silu"))
    x = jnp.asarray(randn(3, 10, 6, seed=6))
    y, losses = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(params, x)
    assert y.shape == x.shape and losses["z_loss"].shape == (3,)
    for g in range(3):
        want, want_losses = apply(params, x[g])
        assert_close(y[g], want, "y", rtol=1e-5, atol=1e-6)
        assert_close(losses["load_balancing"][g], want_losses["load_balancing"], "lb", rtol=1e-6)


def test_zero_bias_state_changes_nothing_and_global_loss_starts_local():
    router = mr.TopK(num_experts=E, k=2)
    params = moe_init(jax.random.key(2), hidden_size=6, intermediate_size=5, router=router)
    x = jnp.asarray(randn(12, 6, seed=7))
    apply = jax.jit(functools.partial(moe_apply, router=router))
    y, losses = apply(params, x)
    y_state, losses_state, state = apply(params, x, state=init_balance_state(router))
    np.testing.assert_array_equal(to_numpy(y_state), to_numpy(y))
    # Counts start at zero: the global-batch loss of the first micro-batch is the local one.
    assert_close(losses_state["global_load_balancing"], losses["load_balancing"], "lb", rtol=1e-6)
    assert int(state["balance"].tokens) == 12 and int(state["balance"].counts.sum()) == 12 * 2
    assert int(reset_accumulation(state)["balance"].tokens) == 0


def test_global_loss_uses_global_counts_and_local_probabilities():
    # Two micro-batches: the second's global loss takes f from both and P from itself only.
    router = mr.TopK(num_experts=E, k=2)
    params = moe_init(jax.random.key(4), hidden_size=6, intermediate_size=5, router=router)
    first, second = jnp.asarray(randn(12, 6, seed=11)), jnp.asarray(randn(12, 6, seed=12))
    apply = jax.jit(functools.partial(moe_apply, router=router))
    _, _, state = apply(params, first, state=init_balance_state(router))
    _, losses, state = apply(params, second, state=state)
    routings = [router(x @ params["gate"]) for x in (first, second)]
    counts = sum(np.bincount(to_numpy(r.choice_ids), minlength=E) for r in routings)
    mean_probs = to_numpy(routings[1].probs).astype(np.float64).mean(axis=0)
    want = E * np.sum(counts / counts.sum() * mean_probs)
    assert_close(losses["global_load_balancing"], want, "global", rtol=1e-5)


def test_expert_bias_steers_selection_only():
    # DeepSeek-V3: the bias decides which experts are picked, never the weights.
    router = mr.TopK(num_experts=E, k=2, score="sigmoid")
    logits = jnp.asarray(randn(T, E, seed=8))
    bias = jnp.asarray([0.0, 0.0, 0.0, 10.0])
    routing = jax.jit(functools.partial(route, router))(logits, bias)
    experts = to_numpy(routing.expert_ids).reshape(T, 2)
    assert np.all(experts[:, 0] == 3)  # everyone now picks expert 3 first
    probs = 1 / (1 + np.exp(-to_numpy(logits).astype(np.float64)))
    picked = np.take_along_axis(probs, experts, axis=1)
    want = picked / picked.sum(axis=1, keepdims=True)
    assert_close(routing.weights, want.reshape(-1), "weights", rtol=1e-6, atol=1e-7)
    assert_close(routing.probs, probs, "probs", rtol=1e-6, atol=1e-7)


def test_deepseek_router_takes_the_bias_itself():
    router = mr.DeepSeekTopK(num_experts=E, k=2)
    logits = jnp.asarray(randn(T, E, seed=13))
    bias = jnp.asarray([0.0, -3.0, 0.0, 3.0])
    got = jax.jit(functools.partial(route, router))(logits, bias)
    want = router(logits, bias)
    np.testing.assert_array_equal(to_numpy(got.expert_ids), to_numpy(want.expert_ids))
    assert_close(got.weights, want.weights, "weights", rtol=1e-6, atol=1e-7)


def test_bias_update_moves_towards_balance():
    router = mr.TopK(num_experts=E, k=1)
    params = moe_init(jax.random.key(3), hidden_size=6, intermediate_size=5, router=router)
    params["gate"] = params["gate"].at[:, 0].add(5.0)  # expert 0 is overloaded
    x = jnp.abs(jnp.asarray(randn(16, 6, seed=9)))
    step = jax.jit(functools.partial(moe_apply, router=router, bias_update_rate=0.1))
    _, _, state = step(params, x, state=init_balance_state(router))
    assert float(state["expert_bias"][0]) == pytest.approx(-0.1)  # overloaded: bias goes down


def test_bad_state_and_router_name_the_parameter():
    logits = jnp.asarray(randn(T, E, seed=10))
    with pytest.raises(ValueError, match="expert_bias"):
        route(mr.TopK(num_experts=E, k=2), logits, jnp.zeros(E + 1))
    with pytest.raises(TypeError, match="expert_bias"):
        route(mr.ExpertChoice(num_experts=E, capacity_factor=1.0), logits, jnp.zeros(E))
    with pytest.raises(ValueError, match="activation"):
        moe_init(
            jax.random.key(0),
            hidden_size=2,
            intermediate_size=2,
            router=mr.TopK(num_experts=E, k=1),
            activation="tanh",
        )


# --- AdaMoE conversion (moerouter.adamoe) -----------------------------------------------------


@pytest.mark.parametrize(("num_null", "k_prime"), [(8, 4), (16, 4), (16, 6)])
def test_to_adamoe_is_bit_identical_and_round_trips(num_null, k_prime):
    from moerouter_jax.layer import from_adamoe, to_adamoe

    router = mr.TopK(8, k=2)
    params = moe_init(
        jax.random.key(num_null), hidden_size=32, intermediate_size=16, router=router,
        activation="gelu",
    )  # fmt: skip
    x = jnp.asarray(randn(150, 32, seed=k_prime))
    apply = functools.partial(moe_apply, activation="gelu")
    before, _ = apply(params, x, router=router)
    converted, null = to_adamoe(params, router, num_null=num_null, k=k_prime)
    assert null == mr.NullExperts(8, num_null=num_null, k=k_prime)
    assert converted["gate"].shape == (32, 8 + num_null) and converted["w_in"] is params["w_in"]
    after, _ = apply(converted, x, router=null)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))  # bit for bit
    jitted = jax.jit(functools.partial(apply, router=null))(converted, x)[0]
    reference = jax.jit(functools.partial(apply, router=router))(params, x)[0]
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(reference))
    back, top2 = from_adamoe(converted, null, k=2)
    assert top2 == router
    np.testing.assert_array_equal(np.asarray(back["gate"]), np.asarray(params["gate"]))


def test_null_init_and_bad_conversions():
    from moerouter_jax.layer import from_adamoe, to_adamoe

    null = mr.NullExperts(4, num_null=8, k=2)
    gate = moe_init(jax.random.key(0), hidden_size=6, intermediate_size=5, router=null)["gate"]
    np.testing.assert_array_equal(np.asarray(gate[:, 4:8]), np.asarray(gate[:, :4]))
    np.testing.assert_array_equal(np.asarray(gate[:, 8:]), np.asarray(gate[:, :4]))
    random = moe_init(
        jax.random.key(0), hidden_size=6, intermediate_size=5, router=null, null_init="random"
    )["gate"]
    assert not np.array_equal(np.asarray(random[:, 4:8]), np.asarray(random[:, :4]))
    with pytest.raises(ValueError, match="null_init must be"):
        moe_init(jax.random.key(0), hidden_size=6, intermediate_size=5, router=null, null_init="x")
    params = moe_init(jax.random.key(0), hidden_size=6, intermediate_size=5, router=mr.TopK(4, k=2))
    with pytest.raises(ValueError, match="k must be >="):
        to_adamoe(params, mr.TopK(4, k=2), num_null=4, k=1)
    with pytest.raises(ValueError, match="num_null must be a multiple"):
        to_adamoe(params, mr.TopK(4, k=2), num_null=6, k=3)
    with pytest.raises(TypeError, match=r"router must be a moerouter\.NullExperts"):
        from_adamoe(params, mr.TopK(4, k=2), k=2)
