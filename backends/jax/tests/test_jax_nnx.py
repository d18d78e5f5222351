"""The Flax NNX module is the functional layer: same outputs, gradients and balancing state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close

nnx = pytest.importorskip("flax.nnx")
from moerouter_jax import init_balance_state, moe_apply  # noqa: E402
from moerouter_jax.nnx import MoE  # noqa: E402


def module_params(moe):
    return {name: getattr(moe, name)[...] for name in moe.param_names}


@pytest.mark.parametrize(
    "shared",
    [None, 3],  # routed experts only; plus an always-on shared expert
    ids=["routed", "shared"],
)
def test_module_equals_functional_layer(shared):
    router = mr.TopK(num_experts=4, k=2)
    moe = MoE(6, 5, router, shared_intermediate_size=shared, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (10, 6))
    y, losses = nnx.jit(lambda moe, x: moe(x))(moe, x)
    want, want_losses = jax.jit(functools.partial(moe_apply, router=router))(module_params(moe), x)
    assert_close(y, want, "y", rtol=1e-6, atol=1e-6)
    assert_close(losses["z_loss"], want_losses["z_loss"], "z_loss", rtol=1e-6)

    def loss(moe, x):
        return jnp.sum(moe(x)[0] ** 2)

    grads = nnx.jit(nnx.grad(loss))(moe, x)
    want_grads = jax.jit(jax.grad(lambda p: jnp.sum(moe_apply(p, x, router=router)[0] ** 2)))(
        module_params(moe)
    )
    for name in moe.param_names:
        assert_close(getattr(grads, name)[...], want_grads[name], name, rtol=1e-5, atol=1e-6)


def test_balance_state_is_updated_in_place_under_nnx_jit():
    router = mr.TopK(num_experts=4, k=2, score="sigmoid")
    moe = MoE(6, 5, router, track_balance=True, bias_update_rate=0.1, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (10, 6))
    step = nnx.jit(lambda moe, x: moe(x))
    functional = jax.jit(functools.partial(moe_apply, router=router, bias_update_rate=0.1))
    state = init_balance_state(router)
    for _ in range(2):
        y, losses = step(moe, x)
        want, _, state = functional(module_params(moe), x, state=state)
        assert_close(y, want, "y", rtol=1e-6, atol=1e-6)
        assert "global_load_balancing" in losses
    np.testing.assert_array_equal(np.asarray(moe.expert_bias[...]), state["expert_bias"])
    assert int(moe.balance_tokens[...]) == 2 * 10
    np.testing.assert_array_equal(np.asarray(moe.balance_counts[...]), state["balance"].counts)


def test_module_to_adamoe_is_bit_identical_and_round_trips():
    router = mr.TopK(num_experts=8, k=2)
    moe = MoE(16, 8, router, activation="gelu", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (60, 16))
    before, _ = moe(x)
    assert moe.to_adamoe(16, 4) is moe
    assert moe.gate[...].shape == (16, 24)
    after, _ = moe(x)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    moe.from_adamoe()
    assert moe.router is router and moe.gate[...].shape == (16, 8)
    np.testing.assert_array_equal(np.asarray(moe(x)[0]), np.asarray(before))
    built = MoE(16, 8, mr.NullExperts(8, num_null=8, k=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="k must be given"):
        built.from_adamoe()
    with pytest.raises(ValueError, match="k must be in"):
        MoE(16, 8, router, rngs=nnx.Rngs(0)).to_adamoe(8, 5)
