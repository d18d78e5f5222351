"""Gradients flow to x, ye and the routing weights (and so the logits) on torch and JAX.

The reference is a float64 NumPy function of the logits and tokens with the routing *decision*
held fixed (selection is piecewise constant, so it has no gradient); its gradient is taken by
central finite differences, accurate to about 1e-8 in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

import moerouter as mr
from moerouter.testing import to_numpy

NUM_TOKENS, NUM_EXPERTS, FEATURES = 6, 4, 3
RNG = np.random.default_rng(20)
LOGITS = RNG.standard_normal((NUM_TOKENS, NUM_EXPERTS)).astype(np.float32)
X = RNG.standard_normal((NUM_TOKENS, FEATURES)).astype(np.float32)
TARGET = RNG.standard_normal((NUM_TOKENS, FEATURES)).astype(np.float32)
SCALE = np.asarray([0.5, -1.0, 1.5, 2.0], np.float32)  # expert e computes tanh(SCALE[e] * x)

ROUTERS = [
    # Mixtral: weights are a softmax over the selected logits only.
    pytest.param(mr.TopK(num_experts=NUM_EXPERTS, k=2), id="topk"),
    # Switch-style raw probabilities: the full softmax's partition function reaches every logit.
    pytest.param(mr.TopK(num_experts=NUM_EXPERTS, k=1, normalize=False), id="topk-raw"),
    # Expert choice: weights are full-softmax probabilities of the chosen (token, expert) pairs.
    pytest.param(mr.ExpertChoice(num_experts=NUM_EXPERTS, capacity_factor=1.0), id="expert-choice"),
]


def softmax(values):
    exp = np.exp(values - values.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def dense_loss(router, routing, logits, x):
    """sum_t target_t . sum_(t, e) w_te tanh(SCALE_e x_t), float64, with the decision fixed."""
    tokens, experts = to_numpy(routing.token_ids), to_numpy(routing.expert_ids)
    if isinstance(router, mr.ExpertChoice) or not router.normalize:
        weights = softmax(logits)[tokens, experts]
    else:
        chosen = experts.reshape(NUM_TOKENS, -1)
        weights = softmax(np.take_along_axis(logits, chosen, axis=1)).reshape(-1)
    y = np.zeros_like(x)
    for token, expert, weight in zip(tokens, experts, weights, strict=True):
        if expert >= 0:
            y[token] += weight * np.tanh(SCALE[expert] * x[token])
    return float(np.sum(y * TARGET))


def finite_difference(function, point, step=1e-6):
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        up, down = point.copy(), point.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (function(up) - function(down)) / (2 * step)
    return grad


def reference_gradients(router, routing):
    logits, x = LOGITS.astype(np.float64), X.astype(np.float64)
    return (
        finite_difference(lambda v: dense_loss(router, routing, v, x), logits),
        finite_difference(lambda v: dense_loss(router, routing, logits, v), x),
    )


def expert_outputs(xe, plan, routing, xp):
    # Row i belongs to expert expert_ids[order[i]] (rows past num_valid: to none, ignored).
    row_expert = xp.take(routing.expert_ids, plan.order)
    scale = xp.take(xp.asarray(SCALE), xp.clip(row_expert, 0, NUM_EXPERTS - 1))
    return xp.tanh(scale[:, None] * xe)


# float32 forward and backward against float64: a few hundred ulp at these magnitudes.
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("router", ROUTERS)
def test_torch_gradients(router):
    torch = pytest.importorskip("torch")
    logits = torch.asarray(LOGITS).requires_grad_()
    x = torch.asarray(X).requires_grad_()
    routing = router(logits)
    plan = mr.make_plan(routing)
    ye = expert_outputs(mr.dispatch(x, plan), plan, routing, array_namespace(x))
    ye.retain_grad()
    y = mr.combine(ye, plan)
    (y * torch.asarray(TARGET)).sum().backward()
    grad_logits, grad_x = reference_gradients(router, routing)
    np.testing.assert_allclose(to_numpy(logits.grad), grad_logits, **GRAD_TOL)
    np.testing.assert_allclose(to_numpy(x.grad), grad_x, **GRAD_TOL)
    # d loss / d ye[row] = weight of the row's assignment * target of its token; 0 past num_valid.
    num_valid = int(plan.num_valid)
    weights = to_numpy(routing.weights)[to_numpy(plan.order)]
    expected = weights[:, None] * TARGET[to_numpy(plan.source_tokens)]
    expected[num_valid:] = 0
    np.testing.assert_allclose(to_numpy(ye.grad), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("router", ROUTERS)
def test_jax_gradients(router):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(logits, x):
        routing = router(logits)
        plan = mr.make_plan(routing)
        ye = expert_outputs(mr.dispatch(x, plan), plan, routing, jnp)
        return jnp.sum(mr.combine(ye, plan) * jnp.asarray(TARGET))

    grad_logits, grad_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(LOGITS), jnp.asarray(X))
    reference = reference_gradients(router, router(LOGITS))
    np.testing.assert_allclose(np.asarray(grad_logits), reference[0], **GRAD_TOL)
    np.testing.assert_allclose(np.asarray(grad_x), reference[1], **GRAD_TOL)


def _expert_rows(num_rows):
    # Rows that differ: with equal rows the output is sum(weights) * row, constant because the
    # weights sum to 1, and the real logits' gradient is zero too (or rounding noise).
    return np.linspace(1.0, 3.0, num_rows * FEATURES, dtype=np.float32).reshape(num_rows, -1)


def null_expert_grad(backend_name):
    # AdaMoE: weights are a softmax over the selected real logits, so the task output gives the
    # null columns (and unselected columns) a gradient of exactly zero.
    logits = np.concatenate([LOGITS, LOGITS[:, ::-1] + 0.25], axis=1)  # 4 real + 4 null
    router = mr.NullExperts(num_experts=NUM_EXPERTS, num_null=4, k=4)
    if backend_name == "torch":
        torch = pytest.importorskip("torch")
        tensor = torch.asarray(logits).requires_grad_()
        routing = router(tensor)
        plan = mr.make_plan(routing)
        ye = torch.asarray(_expert_rows(plan.num_rows))
        (mr.combine(ye, plan) * torch.asarray(TARGET)).sum().backward()
        return to_numpy(tensor.grad), routing
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(values):
        plan = mr.make_plan(router(values))
        ye = jnp.asarray(_expert_rows(plan.num_rows))
        return jnp.sum(mr.combine(ye, plan) * jnp.asarray(TARGET))

    return np.asarray(jax.grad(loss)(jnp.asarray(logits))), router(logits)


@pytest.mark.parametrize("backend_name", ["torch", "jax"])
def test_null_logits_get_no_task_gradient(backend_name):
    grad, routing = null_expert_grad(backend_name)
    assert np.all(grad[:, NUM_EXPERTS:] == 0.0)
    chosen = np.zeros(grad.shape, bool)
    np.put_along_axis(chosen, to_numpy(routing.choice_ids).reshape(NUM_TOKENS, -1), True, axis=1)
    real_chosen = chosen & (np.arange(grad.shape[1]) < NUM_EXPERTS)
    assert np.all(grad[~real_chosen] == 0.0)
    assert np.any(grad[real_chosen] != 0.0)  # the real experts do learn
