"""Mowst's confidence gate, losses and inference rules on every backend against float64 loops."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, to_numpy
from moerouter.testing.asserts import assert_equal
from moerouter.testing.reference.methods import (
    reference_dispersion,
    reference_mixed_logits_loss,
    reference_mlp_confidence,
    reference_power_confidence,
    reference_predict,
    reference_predict_mixed,
    reference_weighted_loss,
)

# Dispersions and confidences pass through a softmax over K <= 8 classes and a few more
# roundings (variance sum, entropy sum, one matmul per MLP layer of width <= 8): well under
# 2**-17 relative; 2**-15 keeps the factor of two and headroom. atol: the variance and entropy
# dispersions of near-uniform rows are differences of O(1) numbers.
TOL = {"rtol": 2.0**-15, "atol": 2.0**-20}
RNG = np.random.default_rng(6)
N, K = 16, 5
WEAK = (2.0 * RNG.standard_normal((N, K))).astype(np.float32)
WEAK[0] = 0.0  # uniform prediction: both dispersions exactly 0
WEAK[1] = [60.0, 0.0, 0.0, 0.0, 0.0]  # one-hot to float32: both dispersions 1
STRONG = (2.0 * RNG.standard_normal((N, K))).astype(np.float32)
LABELS = RNG.integers(0, K, N).astype(np.int32)
CONFIDENCE = RNG.uniform(0.0, 1.0, N).astype(np.float32)
UNIFORM = RNG.uniform(0.0, 1.0, N).astype(np.float32)
NODE_FEATURES = RNG.standard_normal((N, 3)).astype(np.float32)
LAYERS = [  # 2 dispersion + 3 node features -> 4 hidden -> 1
    (RNG.standard_normal((5, 4)).astype(np.float32), RNG.standard_normal(4).astype(np.float32)),
    (RNG.standard_normal((4, 1)).astype(np.float32), RNG.standard_normal(1).astype(np.float32)),
]


def test_dispersion(backend):
    features = mr.confidence.dispersion(backend.asarray(WEAK))
    assert features.shape == (N, 2) and str(features.dtype).endswith("float32")
    expected = reference_dispersion(WEAK)
    assert_close(features, expected, "dispersion", **TOL)
    # Invariants: both in [0, 1]; uniform row 0, one-hot row 1.
    values = to_numpy(features)
    assert np.all(values >= -1e-6) and np.all(values <= 1 + 1e-6)
    np.testing.assert_allclose(values[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(values[1], 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("alpha", "measure"),
    [
        # The legacy code's form: the variance dispersion to a power.
        pytest.param(2.5, "variance", id="variance"),
        # The entropy column, and a power below 1 (raises confidence).
        pytest.param(0.5, "entropy", id="entropy"),
    ],
)
def test_power_confidence(backend, alpha, measure):
    confidence = mr.confidence.power_confidence(backend.asarray(WEAK), alpha, measure=measure)
    expected = reference_power_confidence(WEAK, alpha, measure)
    assert_close(confidence, expected, "power_confidence", **TOL)


@pytest.mark.parametrize(
    "with_features",
    [
        # Dispersion and node features (--original_data true), two layers with a ReLU.
        pytest.param(True, id="with-node-features"),
        # Dispersion only (--original_data false), one layer.
        pytest.param(False, id="dispersion-only"),
    ],
)
def test_mlp_confidence(backend, with_features):
    if with_features:
        layers, extra = LAYERS, NODE_FEATURES
    else:
        layers, extra = [(LAYERS[0][0][:2, :1], LAYERS[0][1][:1])], None
    on_backend = [(backend.asarray(w), backend.asarray(b)) for w, b in layers]
    confidence = mr.confidence.mlp_confidence(
        backend.asarray(WEAK),
        on_backend,
        node_features=None if extra is None else backend.asarray(extra),
    )
    assert confidence.shape == (N,)
    expected = reference_mlp_confidence(WEAK, layers, extra)
    assert_close(confidence, expected, "mlp_confidence", **TOL)


def test_losses(backend):
    args = [backend.asarray(a) for a in (WEAK, STRONG, LABELS, CONFIDENCE)]
    loss = mr.confidence.weighted_loss(*args)
    expected = reference_weighted_loss(WEAK, STRONG, LABELS, CONFIDENCE)
    assert_close(loss, expected, "weighted_loss", **TOL)
    mixed = mr.confidence.mixed_logits_loss(*args)
    expected = reference_mixed_logits_loss(WEAK, STRONG, LABELS, CONFIDENCE)
    assert_close(mixed, expected, "mixed_logits_loss", **TOL)


@pytest.mark.parametrize(
    ("uniform", "threshold"),
    [
        # The paper's sampled rule with given draws.
        pytest.param(UNIFORM, None, id="sampled"),
        # The deterministic threshold variant; 0.5 splits the confidences.
        pytest.param(None, 0.5, id="threshold"),
    ],
)
def test_predict(backend, uniform, threshold):
    predictions, use_weak = mr.confidence.predict(
        backend.asarray(WEAK),
        backend.asarray(STRONG),
        backend.asarray(CONFIDENCE),
        uniform=None if uniform is None else backend.asarray(uniform),
        threshold=threshold,
    )
    expected, expected_weak = reference_predict(WEAK, STRONG, CONFIDENCE, uniform, threshold)
    assert_equal(use_weak, expected_weak, "use_weak")
    assert_equal(predictions, expected, "predictions")
    assert str(predictions.dtype).endswith("int32")
    assert 0 < int(np.sum(to_numpy(use_weak))) < N  # both experts are exercised


def test_predict_mixed(backend):
    predictions = mr.confidence.predict_mixed(
        backend.asarray(WEAK), backend.asarray(STRONG), backend.asarray(CONFIDENCE)
    )
    assert_equal(predictions, reference_predict_mixed(WEAK, STRONG, CONFIDENCE), "predictions")


def test_sampled_rule_uses_weak_with_probability_confidence():
    # Over many draws the weak expert is chosen with frequency C (here per row, 4000 draws).
    draws = np.random.default_rng(1).uniform(size=(4000, 1)).astype(np.float32)
    confidence = np.asarray([0.1, 0.5, 0.9], np.float32)
    weak, strong = np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32)
    share = np.mean(
        [
            mr.confidence.predict(weak, strong, confidence, uniform=np.repeat(u, 3))[1]
            for u in draws
        ],
        axis=0,
    )
    np.testing.assert_allclose(share, confidence, atol=0.03)


def test_learnable_alpha_gradient():
    # The power is learnable: a 0-d tensor gets a finite gradient, also on uniform rows (D = 0).
    torch = pytest.importorskip("torch")
    alpha = torch.asarray(2.0).requires_grad_()
    confidence = mr.confidence.power_confidence(torch.asarray(WEAK), alpha)
    confidence.sum().backward()
    dispersion = np.clip(reference_dispersion(WEAK)[:, 0], 0, 1)
    positive = dispersion > 0
    expected = np.sum(dispersion[positive] ** 2 * np.log(dispersion[positive]))
    assert np.isfinite(float(alpha.grad))
    np.testing.assert_allclose(float(alpha.grad), expected, rtol=1e-4)


def test_jax_jit_and_grad():
    # The gate MLP and the Mowst loss trace under jit and differentiate w.r.t. the gate weights.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(weight, bias):
        confidence = mr.confidence.mlp_confidence(jnp.asarray(WEAK), [(weight, bias)])
        return mr.confidence.weighted_loss(
            jnp.asarray(WEAK), jnp.asarray(STRONG), jnp.asarray(LABELS), confidence
        )

    weight, bias = LAYERS[0][0][:2, :1], LAYERS[0][1][:1]
    grad = jax.jit(jax.grad(loss))(jnp.asarray(weight), jnp.asarray(bias))

    def reference(w):
        confidence = reference_mlp_confidence(WEAK, [(w, bias)])
        return reference_weighted_loss(WEAK, STRONG, LABELS, confidence)

    step = 1e-3  # the reference rounds inputs to float32: keep the step well above that
    expected = np.zeros_like(weight, dtype=np.float64)
    for index in np.ndindex(weight.shape):
        up, down = weight.astype(np.float64), weight.astype(np.float64)
        up[index] += step
        down[index] -= step
        expected[index] = (reference(up) - reference(down)) / (2 * step)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-3, atol=1e-5)


BAD = [
    # One class: no dispersion to measure (log K = 0).
    (lambda: mr.confidence.dispersion(np.ones((2, 1), np.float32)), ValueError, "weak_logits"),
    # Integer logits.
    (lambda: mr.confidence.dispersion(np.ones((2, 3), np.int32)), TypeError, "weak_logits"),
    # A negative power.
    (
        lambda: mr.confidence.power_confidence(np.ones((2, 3), np.float32), -1.0),
        ValueError,
        "alpha",
    ),
    # Unknown dispersion measure.
    (
        lambda: mr.confidence.power_confidence(np.ones((2, 3), np.float32), 1.0, measure="gini"),
        ValueError,
        "measure",
    ),
    # MLP whose first layer does not read 2 features.
    (
        lambda: mr.confidence.mlp_confidence(
            np.ones((2, 3), np.float32), [(np.ones((3, 1), np.float32), np.ones(1, np.float32))]
        ),
        ValueError,
        "layers",
    ),
    # MLP ending in 2 outputs.
    (
        lambda: mr.confidence.mlp_confidence(
            np.ones((2, 3), np.float32), [(np.ones((2, 2), np.float32), np.ones(2, np.float32))]
        ),
        ValueError,
        "last layer",
    ),
    # No layers.
    (lambda: mr.confidence.mlp_confidence(np.ones((2, 3), np.float32), []), TypeError, "layers"),
    # Confidence of the wrong length.
    (
        lambda: mr.confidence.weighted_loss(
            np.ones((2, 3), np.float32),
            np.ones((2, 3), np.float32),
            np.zeros(2, np.int32),
            np.ones(3, np.float32),
        ),
        ValueError,
        "confidence",
    ),
    # Strong logits of another shape.
    (
        lambda: mr.confidence.mixed_logits_loss(
            np.ones((2, 3), np.float32),
            np.ones((2, 4), np.float32),
            np.zeros(2, np.int32),
            np.ones(2, np.float32),
        ),
        ValueError,
        "strong_logits",
    ),
    # Both or neither of uniform and threshold.
    (
        lambda: mr.confidence.predict(
            np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), np.ones(2, np.float32)
        ),
        ValueError,
        "uniform",
    ),
    # Threshold outside [0, 1].
    (
        lambda: mr.confidence.predict(
            np.ones((2, 3), np.float32),
            np.ones((2, 3), np.float32),
            np.ones(2, np.float32),
            threshold=2.0,
        ),
        ValueError,
        "threshold",
    ),
    # Draws of the wrong length.
    (
        lambda: mr.confidence.predict(
            np.ones((2, 3), np.float32),
            np.ones((2, 3), np.float32),
            np.ones(2, np.float32),
            uniform=np.ones(3, np.float32),
        ),
        ValueError,
        "uniform",
    ),
]


@pytest.mark.parametrize(("call", "error", "name"), BAD)
def test_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()
