"""Gradients reach the logits through the new policies on torch and JAX.

With the routing decision fixed, ``loss = sum_(t, j) c_tj w_tj`` for renormalised weights
``w_t = softmax(logits_t[chosen])`` has the closed form ``dloss/dlogit_tj = w_tj (c_tj - sum_i
w_ti c_ti)`` on the chosen columns and 0 elsewhere; anchor averaging spreads a mean's gradient
evenly over the anchor's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, to_numpy

T, E, K, NODES, ANCHORS = 8, 8, 2, 4, 3
RNG = np.random.default_rng(30)
LOGITS = RNG.standard_normal((T, E)).astype(np.float32)
COEFFICIENTS = RNG.standard_normal((T * K,)).astype(np.float32)
TOKEN_NODES = RNG.integers(0, NODES, T).astype(np.int32)
ANCHOR_IDS = np.array([0, 0, 1, -1, 1, 2, 2, 2], np.int32)


def expected_gradient(routing, logits):
    experts = to_numpy(routing.expert_ids).reshape(T, K)
    weights = to_numpy(routing.weights).astype(np.float64).reshape(T, K)
    c = COEFFICIENTS.astype(np.float64).reshape(T, K)
    grad = np.zeros((T, E))
    for t in range(T):
        mean = np.sum(weights[t] * c[t])
        for slot in range(K):
            if experts[t, slot] >= 0:
                grad[t, experts[t, slot]] += weights[t, slot] * (c[t, slot] - mean)
    return grad


def spread_over_anchors(grad):
    out = grad.copy()
    for anchor in range(ANCHORS):
        members = np.flatnonzero(ANCHOR_IDS == anchor)
        out[members] = grad[members].sum(axis=0) / len(members)
    return out


CASES = [
    # Own node plus one remote node: weights are a softmax over the chosen (masked) logits.
    pytest.param("locality", id="locality"),
    # Anchor means: each token's gradient is its anchor's average.
    pytest.param("anchor", id="anchor"),
]


def route(case, logits, xp):
    if case == "locality":
        router = mr.policies.LocalityTopK(num_experts=E, k=K, num_nodes=NODES, max_nodes=2)
        return router(logits, xp.asarray(TOKEN_NODES))
    router = mr.policies.AnchorRouting(mr.TopK(num_experts=E, k=K), num_anchors=ANCHORS)
    return router(logits, xp.asarray(ANCHOR_IDS))


@pytest.mark.parametrize("case", CASES)
def test_torch_gradient(case):
    torch = pytest.importorskip("torch")
    logits = torch.tensor(LOGITS, requires_grad=True)
    routing = route(case, logits, torch)
    (routing.weights * torch.tensor(COEFFICIENTS)).sum().backward()
    want = expected_gradient(routing, LOGITS)
    if case == "anchor":
        want = spread_over_anchors(want)
    assert_close(logits.grad, want, "dloss/dlogits", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_jax_gradient(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(values):
        return jnp.sum(route(case, values, jnp).weights * jnp.asarray(COEFFICIENTS))

    grad = jax.grad(loss)(jnp.asarray(LOGITS))
    routing = route(case, jnp.asarray(LOGITS), jnp)
    want = expected_gradient(routing, LOGITS)
    if case == "anchor":
        want = spread_over_anchors(want)
    assert_close(grad, want, "dloss/dlogits", rtol=1e-5, atol=1e-6)
