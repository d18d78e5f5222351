"""Failure model: a batch with no tokens.

An empty batch is normal: an expert-parallel rank that received no tokens, the last
micro-batch of an epoch, a serving step with nothing queued. Raising on it ("logits must hold at
least one token"), crashing in a reshape (``(0, -1)`` cannot be inferred) or dividing by zero
(``T // G`` with ``G = 0`` groups) makes one rank fail and the others wait for it.

Here ``T = 0`` (2-D logits), ``G = 0`` groups and ``S = 0`` tokens per group run through every
token-wise public call (``public_calls.TOKEN_WISE``: every policy, loss, stat, ``make_plan``
(packed and padded), ``dispatch`` and ``combine``) on NumPy, array-api-strict, PyTorch and JAX,
through each backend's own kernels and through the agnostic path. The contract: the same
static-shape rules give empty results (``R = 0``, ``(0, d)`` outputs), nothing is NaN, and every
loss and every scalar statistic is exactly ``0.0``, with a zero gradient. The layers
(``moerouter_torch.MoE``, ``moerouter_jax.moe_apply`` and its NNX module) run forward and
backward on no tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from public_calls import NULL, TOKEN_WISE, D, E, Inputs, K, leaves

import moerouter as mr
from moerouter.testing import Backend, to_numpy, use_backend

# (T,) with T = 0; (G, S) with no groups; (G, S) with empty groups.
EMPTY = {"T=0": (0,), "G=0": (0, 8), "S=0": (2, 0)}


def _inputs(backend: Backend) -> Inputs:
    return Inputs(backend.asarray, backend.namespace())


@pytest.fixture(params=["own kernels", "reference"])
def path(request):
    """The backend's plugin kernels (NumPy, torch, JAX), or MOEROUTER_BACKEND=reference."""
    with use_backend("reference" if request.param == "reference" else "kernels"):
        yield request.param


@pytest.mark.parametrize("lead", list(EMPTY.values()), ids=list(EMPTY))
@pytest.mark.parametrize("name", sorted(TOKEN_WISE))
def test_token_wise_call_works_on_zero_tokens(name, lead, backend):
    out = TOKEN_WISE[name](_inputs(backend), lead)
    values = [to_numpy(leaf) for leaf in leaves(out)]
    assert values
    for value in values:
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), f"{name}: NaN or inf from no tokens"
        if value.ndim == 0:  # every loss, mean, share and ratio of no tokens is 0
            assert value == 0, f"{name}: {value} on zero tokens"


POLICIES = {name for name, call in TOKEN_WISE.items() if name[0].isupper()}


@pytest.mark.parametrize("lead", list(EMPTY.values()), ids=list(EMPTY))
@pytest.mark.parametrize("name", sorted(POLICIES - {"SoftMoE", "FrozenRandomRouter"}))
def test_routing_plan_dispatch_combine_of_no_tokens(name, lead, backend, path):
    out = TOKEN_WISE[name](_inputs(backend), lead)
    routing = out if isinstance(out, mr.Routing) else None
    if routing is None:  # SparsityConstrainedExpertChoice[plan]: the plan array
        assert to_numpy(out).shape == (*lead, E)
        return
    num_groups = lead[0] if len(lead) == 2 else 1
    assert (routing.num_tokens, routing.num_groups) == (0, num_groups)
    for array in (routing.token_ids, routing.expert_ids, routing.weights, routing.choice_ids):
        assert to_numpy(array).shape == (0,)
    assert to_numpy(routing.probs).shape == (0, routing.num_choices)
    assert to_numpy(routing.finite_rows).shape == (0,)
    plan = mr.make_plan(routing)
    np.testing.assert_array_equal(to_numpy(plan.group_sizes), np.zeros(E, np.int32))
    assert int(to_numpy(plan.num_valid)) == 0
    assert to_numpy(plan.combine_rows).shape == (0, routing.fan_in)
    x = backend.asarray(np.zeros((0, D), np.float32))
    xe = mr.dispatch(x, plan)
    y = mr.combine(xe, plan)
    assert to_numpy(xe).shape == (0, D) and to_numpy(y).shape == (0, D)
    assert y.dtype == x.dtype


def test_soft_moe_of_no_tokens(backend):
    soft, slots, y = TOKEN_WISE["SoftMoE"](_inputs(backend), (2, 0))
    assert to_numpy(soft.dispatch_weights).shape == (2, 0, 2 * E)
    # Slots average no token: exactly zero, not 0 / 0.
    np.testing.assert_array_equal(to_numpy(slots), np.zeros((2, 2 * E, D), np.float32))
    assert to_numpy(y).shape == (2, 0, D)


LOSSES = {
    "load_balancing": lambda routing, logits: mr.losses.load_balancing(routing),
    "load_balancing[gshard]": lambda routing, logits: mr.losses.load_balancing(
        routing, convention="gshard"
    ),
    "null_load_balancing": lambda routing, logits: mr.losses.null_load_balancing(routing),
    "sequence_load_balancing": lambda routing, logits: mr.losses.sequence_load_balancing(routing),
    "importance_loss": lambda routing, logits: mr.losses.importance_loss(routing),
    "entropy": lambda routing, logits: mr.losses.entropy(routing),
    "z_loss": lambda routing, logits: mr.losses.z_loss(logits),
    "load_loss": lambda routing, logits: mr.losses.load_loss(logits, logits, 1.0, k=K),
}


@pytest.mark.parametrize("lead", list(EMPTY.values()), ids=list(EMPTY))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_loss_of_no_tokens_is_zero_with_zero_gradient(loss, lead):
    torch = pytest.importorskip("torch")
    logits = torch.zeros((*lead, E + NULL), requires_grad=True)
    routing = mr.NullExperts(E, NULL, K)(logits)
    value = LOSSES[loss](routing, logits)
    assert value.dtype == torch.float32 and value.shape == () and value.item() == 0.0
    value.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_loss_of_no_tokens_with_a_mask_of_no_groups():
    # A (G, S) mask with G = 0 carries an S the routing does not record: any S fits.
    logits = np.zeros((0, 8, E), np.float32)
    routing = mr.TopK(E, K)(logits)
    mask = np.zeros((0, 8), bool)
    assert float(mr.losses.load_balancing(routing, mask=mask)) == 0.0
    assert int(np.sum(mr.stats.co_occurrence(routing, mask=mask))) == 0


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6)], ids=["T=0", "S=0"])
@pytest.mark.parametrize("router", [mr.TopK(E, K), mr.NullExperts(E, NULL, K), mr.ExpertChoice(E)])
def test_torch_moe_forward_and_backward_on_no_tokens(router, shape, path):
    torch = pytest.importorskip("torch")
    moerouter_torch = pytest.importorskip("moerouter_torch")
    layer = moerouter_torch.MoE(6, 8, router, shared_intermediate_size=4)
    x = torch.zeros(shape, requires_grad=True)
    y, losses = layer(x)
    assert y.shape == x.shape
    assert {name: value.item() for name, value in losses.items()} == {
        "load_balancing": 0.0,
        "z_loss": 0.0,
    }
    (y.sum() + sum(losses.values())).backward()
    assert x.grad.shape == x.shape
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert torch.count_nonzero(parameter.grad) == 0, name


@pytest.mark.parametrize("router", [mr.TopK(E, K), mr.NullExperts(E, NULL, K), mr.ExpertChoice(E)])
def test_jax_layer_forward_and_backward_on_no_tokens_under_jit(router):
    jax = pytest.importorskip("jax")
    moerouter_jax = pytest.importorskip("moerouter_jax")
    jnp = jax.numpy
    params = moerouter_jax.moe_init(
        jax.random.key(0),
        hidden_size=6,
        intermediate_size=8,
        router=router,
        shared_intermediate_size=4,
    )
    # The expert-bias state steers TopK only; the global-batch counts work with any router.
    state = moerouter_jax.init_balance_state(router) if isinstance(router, mr.TopK) else None

    @jax.jit
    def loss(params, x):
        y, losses, *new_state = moerouter_jax.moe_apply(
            params, x, router=router, state=state, bias_update_rate=0.1
        )
        return jnp.sum(y) + sum(losses.values()), (y, losses, new_state)

    x = jnp.zeros((2, 0, 6))
    (value, (y, losses, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
    assert y.shape == x.shape and float(value) == 0.0
    assert all(float(v) == 0.0 for v in losses.values())
    if state is not None:
        assert int(new_state[0]["balance"].tokens) == 0
        np.testing.assert_array_equal(np.asarray(new_state[0]["expert_bias"]), np.zeros(E))
    for name, grad in grads.items():
        assert grad.shape == params[name].shape and not np.any(np.asarray(grad)), name


def test_jax_nnx_module_on_no_tokens():
    pytest.importorskip("flax")
    jnp = pytest.importorskip("jax").numpy
    from flax import nnx
    from moerouter_jax.nnx import MoE

    moe = MoE(6, 8, mr.TopK(E, K), track_balance=True, bias_update_rate=0.1, rngs=nnx.Rngs(0))
    y, losses = moe(jnp.zeros((0, 6)))
    assert y.shape == (0, 6)
    assert all(float(v) == 0.0 for v in losses.values())
    np.testing.assert_array_equal(np.asarray(moe.balance_counts[...]), np.zeros(E, np.int32))
