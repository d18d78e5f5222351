"""cosine_router_logits (Tutel's cosine router) on every backend, its gradients and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, to_numpy
from moerouter.testing.reference.gates import reference_cosine_router_logits

COSINE = [
    # Tutel's initial temperature, log(1 / 0.5): scale 2.
    pytest.param(math.log(2.0), False, id="init-scale"),
    # Above the clamp: the scale stops at 100.
    pytest.param(10.0, False, id="clamped"),
    # The learnable log-scale as an array of shape (1,), as Tutel's parameter.
    pytest.param(0.3, True, id="array-scale"),
]


@pytest.mark.parametrize(("log_scale", "as_array"), COSINE)
def test_cosine_router_logits(backend, log_scale, as_array):
    rng = np.random.default_rng(72)
    h = rng.standard_normal((2, 6, 5)).astype(np.float32)
    h[0, 0] = 0.0  # a zero token: eps keeps it finite (all-zero logits)
    w = (rng.standard_normal((5, 4)) * 0.01).astype(np.float32)
    scale = backend.asarray(np.array([log_scale], np.float32)) if as_array else log_scale
    logits = mr.cosine_router_logits(backend.asarray(h), backend.asarray(w), scale)
    expected = reference_cosine_router_logits(h, w, log_scale)
    assert_close(logits, expected, "logits", rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(to_numpy(logits)) <= min(math.exp(log_scale), 100.0) * (1 + 1e-6))


def test_cosine_router_gradients_torch():
    # Gradients reach tokens, embeddings and the temperature (below the clamp), not above it.
    torch = pytest.importorskip("torch")
    h = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    for tau, grad_expected in ((0.5, True), (10.0, False)):
        log_scale = torch.tensor([tau], requires_grad=True)
        mr.cosine_router_logits(h, w, log_scale).square().sum().backward()
        assert (log_scale.grad.abs().sum() > 0) == grad_expected
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_cosine_router_errors(backend):
    h = backend.asarray(np.ones((3, 5), np.float32))
    w = backend.asarray(np.ones((5, 4), np.float32))
    with pytest.raises(ValueError, match="expert_embeddings"):
        mr.cosine_router_logits(h, backend.asarray(np.ones((4, 4), np.float32)), 0.0)
    with pytest.raises(ValueError, match="log_scale"):
        mr.cosine_router_logits(h, w, backend.asarray(np.zeros(2, np.float32)))
    with pytest.raises(TypeError, match="tokens"):
        mr.cosine_router_logits(backend.asarray(np.ones((3, 5), np.int32)), w, 0.0)
    with pytest.raises(TypeError, match="log_scale"):
        mr.cosine_router_logits(h, w, "hot")
