"""FrozenRandomRouter (SMoE-Dropout's gate) on every backend: seeded, nn.Linear-like, frozen."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, to_numpy
from moerouter.testing.reference.token_choice import reference_topk


def test_frozen_random_router(backend):
    # Same seed, same router on every backend; PyTorch's nn.Linear bound 1/sqrt(d).
    router = mr.FrozenRandomRouter(d_model=16, num_experts=8, seed=4)
    assert np.abs(router.weight_matrix).max() <= 0.25
    x = np.random.default_rng(71).standard_normal((12, 16)).astype(np.float32)
    logits = router(backend.asarray(x))
    expected = x.astype(np.float64) @ router.weight_matrix + router.bias_vector
    assert_close(logits, expected, "logits", rtol=1e-5, atol=1e-6)
    # SMoE-Dropout's gate: top-k of the raw logits, softmax over the k selected.
    routing = mr.TopK(8, 2)(logits)
    assert_routing_equal(routing, reference_topk(to_numpy(logits), 2))
    other = mr.FrozenRandomRouter(d_model=16, num_experts=8, seed=5)
    assert not np.array_equal(router.weight_matrix, other.weight_matrix)
    assert mr.FrozenRandomRouter(16, 8, seed=6, bias=False).bias_vector is None
    with pytest.raises(ValueError, match="d_model"):
        router(backend.asarray(np.zeros((2, 15), np.float32)))


def test_frozen_random_router_gets_no_gradient():
    # The router is frozen: only x receives a gradient.
    torch = pytest.importorskip("torch")
    router = mr.FrozenRandomRouter(d_model=4, num_experts=3, seed=7)
    x = torch.randn(5, 4, requires_grad=True)
    router(x).sum().backward()
    assert x.grad is not None
