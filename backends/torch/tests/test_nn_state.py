"""The torch ``MoE``'s balancing state (``track_balance``): the JAX layer's state, as buffers.

The expert bias (DeepSeek-V3's auxiliary-loss-free balancing) and the global-batch counts are a
:class:`moerouter.losses.MoEState` held as buffers and updated in training with
:func:`moerouter.losses.moe_state_update`, the function the JAX layer uses: on the same weights
and inputs both give the same routings and the same state, step after step.
"""

import io

import numpy as np
import pytest
import torch
from moerouter_torch import MoE

import moerouter as mr

D, H, E = 8, 12, 4
BUFFERS = ("expert_bias", "balance_counts", "balance_prob_sums", "balance_tokens")

ROUTERS = {
    "topk": mr.TopK(num_experts=E, k=2),
    "topk-sigmoid-capacity": mr.TopK(
        num_experts=E, k=2, score="sigmoid", capacity_factor=1.0, drop_policy="probs"
    ),
    "deepseek": mr.DeepSeekTopK(num_experts=E, k=2, num_groups=2, topk_groups=1),
}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer(router=ROUTERS["topk"], rate=0.1, **options):
    torch.manual_seed(0)
    return MoE(D, H, router, track_balance=True, bias_update_rate=rate, **options)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_same_routing_and_state_trajectory_as_the_jax_layer(name):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from moerouter_jax.layer import moe_apply, route

    router = ROUTERS[name]
    torch_layer = layer(router, shared_intermediate_size=6)
    params = {
        "gate": jnp.asarray(torch_layer.gate.weight.detach().numpy().T),
        "w_in": jnp.asarray(torch_layer.experts.w_in.detach().numpy()),
        "w_out": jnp.asarray(torch_layer.experts.w_out.detach().numpy()),
        "shared_w_in": jnp.asarray(torch_layer.shared.w_in.detach().numpy()),
        "shared_w_out": jnp.asarray(torch_layer.shared.w_out.detach().numpy()),
    }
    state = mr.losses.moe_state_init(E, xp=jnp)
    moved = False
    for step in range(4):
        x = randn(16, D, seed=step) * 3
        torch_routing = _biased_routing(torch_layer, x)  # what the layer's call will route
        y, losses = torch_layer(x)
        jax_logits = jnp.asarray(torch_layer.gate_logits(x).detach().numpy())
        jax_routing = route(router, jax_logits, state.expert_bias)
        y_jax, losses_jax, state = moe_apply(
            params, jnp.asarray(x.numpy()), router=router, state=state, bias_update_rate=0.1
        )
        # The same choices from the same bias (the bias is exactly equal at every step).
        np.testing.assert_array_equal(torch_routing.expert_ids.numpy(), jax_routing.expert_ids)
        np.testing.assert_array_equal(torch_layer.expert_bias.numpy(), state.expert_bias)
        np.testing.assert_array_equal(torch_layer.balance_counts.numpy(), state.balance.counts)
        np.testing.assert_array_equal(torch_layer.balance_tokens.numpy(), state.balance.tokens)
        np.testing.assert_allclose(
            torch_layer.balance_prob_sums.numpy(), state.balance.prob_sums, rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            float(losses["global_load_balancing"].detach()),
            float(losses_jax["global_load_balancing"]),
            rtol=1e-6,
        )
        np.testing.assert_allclose(y.detach().numpy(), y_jax, rtol=1e-5, atol=1e-5)
        moved = moved or bool(torch_layer.expert_bias.any())
    assert moved  # the bias steered some steps


def _biased_routing(torch_layer, x):
    from moerouter.policies._expert_bias import route_with_expert_bias

    with torch.no_grad():
        logits = torch_layer.gate_logits(x)
        return route_with_expert_bias(torch_layer.router, logits, torch_layer.expert_bias)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_routing_uses_the_bias_for_selection_only(name):
    jax = pytest.importorskip("jax")
    from moerouter_jax.layer import route

    torch_layer = layer(ROUTERS[name])
    with torch.no_grad():
        torch_layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    x = randn(16, D, seed=7)
    ours = _biased_routing(torch_layer, x)
    theirs = route(
        ROUTERS[name],
        jax.numpy.asarray(torch_layer.gate_logits(x).detach().numpy()),
        jax.numpy.asarray(torch_layer.expert_bias.numpy()),
    )
    np.testing.assert_array_equal(ours.expert_ids.numpy(), theirs.expert_ids)
    np.testing.assert_allclose(ours.weights.numpy(), theirs.weights, rtol=1e-6)
    np.testing.assert_allclose(ours.probs.numpy(), theirs.probs, rtol=1e-6)
    unbiased = torch_layer.router(torch_layer.gate_logits(x))
    assert not torch.equal(ours.expert_ids, unbiased.expert_ids)  # the bias moved choices


def test_state_survives_state_dict_save_and_load():
    trained = layer()
    for step in range(3):
        trained(randn(10, D, seed=step))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = layer(rate=0.1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in BUFFERS:
        assert torch.equal(getattr(restored, name), getattr(trained, name)), name
    x = randn(10, D, seed=9)
    y, losses = trained(x)
    y_restored, losses_restored = restored(x)
    torch.testing.assert_close(y_restored, y, rtol=0, atol=0)
    assert torch.equal(restored.expert_bias, trained.expert_bias)
    assert torch.equal(losses_restored["global_load_balancing"], losses["global_load_balancing"])


def test_eval_reads_the_state_and_reset_clears_the_counts():
    moe = layer()
    moe(randn(10, D))
    before = {name: getattr(moe, name).clone() for name in BUFFERS}
    moe.eval()
    _, losses = moe(randn(10, D, seed=1))
    assert "global_load_balancing" in losses
    for name in BUFFERS:
        assert torch.equal(getattr(moe, name), before[name]), name
    assert moe.reset_accumulation() is moe
    assert int(moe.balance_tokens) == 0 and int(moe.balance_counts.sum()) == 0
    assert torch.equal(moe.expert_bias, before["expert_bias"])  # the bias is kept


def test_state_has_no_autograd_history_and_gradients_flow():
    moe = layer()
    y, losses = moe(randn(10, D))
    (y.sum() + losses["global_load_balancing"]).backward()
    assert moe.gate.weight.grad is not None
    assert all(not getattr(moe, name).requires_grad for name in BUFFERS)
    state = moe.balance_state
    assert isinstance(state, mr.losses.MoEState) and state.expert_bias is moe.expert_bias


def test_first_global_loss_equals_the_local_loss():
    moe = layer(rate=0.0)
    _, losses = moe(randn(10, D))
    torch.testing.assert_close(losses["global_load_balancing"], losses["load_balancing"])
    assert int(moe.balance_tokens) == 10 and torch.equal(moe.expert_bias, torch.zeros(E))


def test_zero_tokens():
    moe = layer()
    y, losses = moe(randn(0, D))
    assert y.shape == (0, D)
    assert float(losses["global_load_balancing"].detach()) == 0.0
    assert int(moe.balance_tokens) == 0
    assert torch.equal(moe.expert_bias, torch.zeros(E))  # sign(0) = 0: no move


def test_meta_device():
    moe = layer(device="meta")
    for name in BUFFERS:
        assert getattr(moe, name).device.type == "meta", name
    y, losses = moe(torch.empty(6, D, device="meta"))
    assert y.device.type == "meta"
    assert losses["global_load_balancing"].device.type == "meta"
    assert moe.expert_bias.device.type == "meta"


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compiles_and_updates_the_buffers_as_eager(use_backend):
    use_backend("torch")
    eager, compiled = layer(), layer()
    torch._dynamo.reset()
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        x = randn(12, D, seed=seed)
        y, _ = eager(x)
        y_compiled, losses = step(x)
        torch.testing.assert_close(y_compiled, y)
        for name in ("expert_bias", "balance_counts", "balance_tokens"):
            assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    (y_compiled.sum() + losses["global_load_balancing"]).backward()
    assert compiled.gate.weight.grad is not None


def test_adamoe_conversion_restarts_the_counts():
    moe = layer(rate=0.1)
    moe(randn(10, D))
    moe.to_adamoe(num_null=4, k=3)
    assert moe.balance_counts.shape == (E + 4,) and int(moe.balance_tokens) == 0
    assert "balance_counts" in dict(moe.named_buffers())
    moe.from_adamoe()
    assert moe.balance_counts.shape == (E,)


def test_without_track_balance_there_is_no_state():
    moe = MoE(D, H, ROUTERS["topk"])
    assert not list(moe.buffers())
    _, losses = moe(randn(5, D))
    assert "global_load_balancing" not in losses
    assert moe.balance_state is None
    moe.reset_accumulation()  # nothing to clear


def test_bad_options():
    with pytest.raises(ValueError, match="bias_update_rate"):
        layer(rate=-1.0)
    with pytest.raises(TypeError, match="bias_update_rate"):
        layer(rate=True)
    moe = MoE(D, H, mr.ExpertChoice(num_experts=E, capacity_factor=1.0), track_balance=True)
    with pytest.raises(TypeError, match=r"DeepSeekTopK or moerouter\.TopK"):
        moe(randn(5, D))
