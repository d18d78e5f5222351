"""Dual-head distillation losses on every backend against float64 references, with gradients."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, to_numpy
from moerouter.testing.reference.methods import (
    reference_align_gradients,
    reference_binary_kl,
    reference_binary_kl_norm,
    reference_cross_entropy,
    reference_dual_head_loss,
)

# Each loss sums at most N * K = 64 float32 terms, each a few roundings of exp/log1p away from
# exact: under 64 * 4 * 2**-24 = 2**-16 relative; 2**-14 gives the usual factor of two and more.
# The atol covers BinaryKL-Norm's cancellation (-log 2 + log 2) of O(T^2) terms near d = 0.
TOL = {"rtol": 2.0**-14, "atol": 2.0**-16}
RNG = np.random.default_rng(8)
N, K = 8, 6
TEACHER = (3.0 * RNG.standard_normal((N, K))).astype(np.float32)
STUDENT = (3.0 * RNG.standard_normal((N, K))).astype(np.float32)
MAIN = RNG.standard_normal((N, K)).astype(np.float32)
LABELS = RNG.integers(0, K, N).astype(np.int32)

CASES = [
    # Ordinary student and teacher logits, the recipe's temperature.
    pytest.param(STUDENT, TEACHER, 2.0, id="random-T2"),
    # T = 1 and logits 40 apart: a clamped sigmoid (the official eps) would cap the loss here.
    pytest.param(TEACHER + 40.0, TEACHER, 1.0, id="far-apart"),
    # Student equal to the teacher: the loss is exactly its minimum, 0.
    pytest.param(TEACHER, TEACHER, 4.0, id="matched"),
]


@pytest.mark.parametrize(("student", "teacher", "temperature"), CASES)
def test_binary_kl_losses(backend, student, teacher, temperature):
    s, t = backend.asarray(student), backend.asarray(teacher)
    norm = mr.distillation.binary_kl_norm(s, t, temperature=temperature)
    assert norm.shape == () and str(norm.dtype).endswith("float32")
    expected = reference_binary_kl_norm(student, teacher, temperature)
    assert_close(norm, expected, "binary_kl_norm", **TOL)
    plain = mr.distillation.binary_kl(s, t, temperature=temperature)
    assert_close(plain, reference_binary_kl(student, teacher, temperature), "binary_kl", **TOL)
    if student is teacher:
        assert float(norm) == 0.0 and abs(float(plain)) < 1e-6


def test_cross_entropy_and_dual_head(backend):
    ce = mr.distillation.cross_entropy(backend.asarray(MAIN), backend.asarray(LABELS))
    assert_close(ce, reference_cross_entropy(MAIN, LABELS), "cross_entropy", **TOL)
    loss = mr.distillation.dual_head_loss(
        backend.asarray(MAIN),
        backend.asarray(STUDENT),
        backend.asarray(TEACHER),
        backend.asarray(LABELS),
        ce_weight=0.5,
        kd_weight=0.1,
        temperature=4.0,
    )
    expected = reference_dual_head_loss(MAIN, STUDENT, TEACHER, LABELS, 0.5, 0.1, 4.0)
    assert_close(loss, expected, "dual_head_loss", **TOL)


@pytest.mark.parametrize(
    "gradients",
    [
        # Mixed signs: rows 1 and 3 conflict with row 0 and are projected, row 2 is not.
        pytest.param(RNG.standard_normal((4, 10)).astype(np.float32), id="random"),
        # A zero reference gradient: nothing to project onto, the rows are summed unchanged.
        pytest.param(
            np.vstack([np.zeros(5), np.ones(5), -np.ones(5)]).astype(np.float32), id="zero"
        ),
    ],
)
def test_align_gradients(backend, gradients):
    aligned = mr.distillation.align_gradients(backend.asarray(gradients))
    expected = reference_align_gradients(gradients)
    assert_close(aligned, expected, "align_gradients", rtol=2.0**-16, atol=2.0**-20)
    # Invariant: no projected row points against the reference gradient any more.
    reference = gradients[0].astype(np.float64)
    if np.any(reference):
        assert float(np.dot(expected - gradients[0], reference)) >= -1e-5


def finite_difference(function, point, step=1e-6):
    grad = np.zeros_like(point, dtype=np.float64)
    for index in np.ndindex(point.shape):
        up, down = point.astype(np.float64), point.astype(np.float64)
        up[index] += step
        down[index] -= step
        grad[index] = (function(up) - function(down)) / (2 * step)
    return grad


def reference_grads():
    """d loss / d (main, aux) of the dual-head objective, float64 central differences."""

    def loss(main, aux):
        return reference_dual_head_loss(main, aux, TEACHER, LABELS, 0.5, 2.0, 2.0)

    # The reference rounds its inputs to float32; differentiate a float64 version instead.
    def ce(main):
        shifted = main - main.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_probs[np.arange(N), LABELS].mean()

    def kd(aux):
        d = np.abs(aux - TEACHER) / 2.0
        return 4.0 * (0.5 * d + np.log1p(np.exp(-d)) - np.log(2.0)).sum() / N

    main, aux = MAIN.astype(np.float64), STUDENT.astype(np.float64)
    assert abs(0.5 * ce(main) + 2.0 * kd(aux) - loss(MAIN, STUDENT)) < 1e-9
    return finite_difference(lambda m: 0.5 * ce(m), MAIN), finite_difference(
        lambda a: 2.0 * kd(a), STUDENT
    )


# float32 forward and backward against float64: a few hundred ulp at these magnitudes.
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


def test_torch_gradients():
    torch = pytest.importorskip("torch")
    main = torch.asarray(MAIN).requires_grad_()
    aux = torch.asarray(STUDENT).requires_grad_()
    teacher = torch.asarray(TEACHER)
    loss = mr.distillation.dual_head_loss(
        main, aux, teacher, torch.asarray(LABELS), ce_weight=0.5, kd_weight=2.0
    )
    loss.backward()
    grad_main, grad_aux = reference_grads()
    np.testing.assert_allclose(to_numpy(main.grad), grad_main, **GRAD_TOL)
    np.testing.assert_allclose(to_numpy(aux.grad), grad_aux, **GRAD_TOL)


def test_jax_gradients():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(main, aux):
        return mr.distillation.dual_head_loss(
            main, aux, jnp.asarray(TEACHER), jnp.asarray(LABELS), ce_weight=0.5, kd_weight=2.0
        )

    grad_main, grad_aux = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(MAIN), jnp.asarray(STUDENT)
    )
    expected_main, expected_aux = reference_grads()
    np.testing.assert_allclose(np.asarray(grad_main), expected_main, **GRAD_TOL)
    np.testing.assert_allclose(np.asarray(grad_aux), expected_aux, **GRAD_TOL)


def test_gradient_is_bounded_far_from_the_teacher():
    # BinaryKL-Norm's gradient is T/(2N) tanh(d/2): finite and nonzero even 1000 logits apart,
    # where a log of a clamped probability would have none.
    torch = pytest.importorskip("torch")
    student = torch.asarray(TEACHER + 1000.0).requires_grad_()
    mr.distillation.binary_kl_norm(student, torch.asarray(TEACHER)).backward()
    np.testing.assert_allclose(to_numpy(student.grad), np.full((N, K), 2.0 / (2 * N)), rtol=1e-6)


BAD = [
    # Integer logits: every loss needs real floating inputs.
    (
        lambda xp: mr.distillation.cross_entropy(
            xp.ones((2, 3), dtype=xp.int32), xp.zeros(2, dtype=xp.int32)
        ),
        TypeError,
        "logits",
    ),
    # Float labels.
    (lambda xp: mr.distillation.cross_entropy(xp.ones((2, 3)), xp.ones(2)), TypeError, "labels"),
    # Student and teacher of different shapes.
    (
        lambda xp: mr.distillation.binary_kl_norm(xp.ones((2, 3)), xp.ones((2, 4))),
        ValueError,
        "teacher_logits",
    ),
    # Temperature must be positive.
    (
        lambda xp: mr.distillation.binary_kl_norm(
            xp.ones((2, 3)), xp.ones((2, 3)), temperature=0.0
        ),
        ValueError,
        "temperature",
    ),
    # A 1-D student.
    (lambda xp: mr.distillation.binary_kl(xp.ones(3), xp.ones(3)), ValueError, "student_logits"),
    # Aux head of another width than the main head.
    (
        lambda xp: mr.distillation.dual_head_loss(
            xp.ones((2, 3)), xp.ones((2, 4)), xp.ones((2, 4)), xp.zeros(2, dtype=xp.int32)
        ),
        ValueError,
        "aux_logits",
    ),
    # Gradients must be (L, P).
    (lambda xp: mr.distillation.align_gradients(xp.ones(3)), ValueError, "gradients"),
]


@pytest.mark.parametrize(("call", "error", "name"), BAD)
def test_bad_input(call, error, name):
    import numpy as xp

    with pytest.raises(error, match=name):
        call(xp)


def test_out_of_range_label_gives_nan(backend):
    # No host sync to check label values: a bad label shows as a NaN loss instead.
    xp = backend.namespace()
    loss = mr.distillation.cross_entropy(xp.ones((2, 3)), backend.asarray(np.int32([0, 3])))
    assert np.isnan(float(loss))


def test_mixed_backends_raise():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="one array library"):
        mr.distillation.binary_kl_norm(torch.ones((2, 3)), np.ones((2, 3), np.float32))
