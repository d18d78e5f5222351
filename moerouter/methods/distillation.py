r"""Dual-head knowledge distillation (Yang, Zong, Huang, Feng, An; arXiv 2411.08937).

A student's linear classifier is split into two heads on one backbone: the **main head** is
trained with cross-entropy on the labels, the **auxiliary head** with a logit-level loss against
the teacher's logits (BinaryKL-Norm), and only the main head is used at inference. The paper
attributes the failure of adding a logit-level loss to a single head to gradients that conflict in
the classifier but not in the backbone; separate heads remove the conflict.

Every function is a pure loss of arrays, computed in float32 with numerically stable
log-sigmoid and log-softmax, and returns a float32 scalar of the inputs' backend. They are
differentiable on PyTorch and JAX. As in the authors' code, pass the teacher's logits without a
gradient (``torch.no_grad()`` / ``jax.lax.stop_gradient``): these functions do not detach them.

Verified against the official code (``penghui-yang/DHKD`` @ 7976c69d:
``distiller_zoo/BinaryKLNorm.py``, ``distiller_zoo/BinaryKL.py``, ``helper/loops.py``,
``helper/optimizer.py``). The paper body could not be read; its result tables are UNVERIFIED.
"""

from __future__ import annotations

import math
from typing import Any

from moerouter._agnostic.scores import log_sigmoid, log_softmax
from moerouter._agnostic.select import pick_columns
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import check_real, check_shape, class_labels, float_array, namespace

__all__ = [
    "align_gradients",
    "binary_kl",
    "binary_kl_norm",
    "cross_entropy",
    "dual_head_loss",
]


@fill_doc
def cross_entropy(logits: Array, labels: Array, *, xp: Any = None) -> Array:
    r"""Mean cross-entropy of class logits against integer labels.

    :math:`L = -\frac{1}{N}\sum_n \log \mathrm{softmax}(z_n)_{y_n}`, with a max-shifted
    log-softmax in float32. This is the main head's loss in dual-head distillation.

    Parameters
    ----------
    logits : array (N, K)
        Class logits, any real floating dtype.
    labels : array (N,)
        Integer class of each row, in ``[0, K)``; a label outside it makes the loss NaN (a
        range check would cost a host synchronisation on every call).
    %(xp)s

    Returns
    -------
    array ()
        float32 scalar :math:`L`; NaN when a label is out of range.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[0.0, 0.0], [0.0, 0.0]])
    >>> round(float(mr.distillation.cross_entropy(logits, xp.asarray([0, 1]))), 6)  # log 2
    0.693147
    """
    xp = namespace(logits, labels, xp=xp)
    values = float_array(logits, "logits", ndim=(2,), xp=xp)
    num_rows = int(values.shape[0])
    if num_rows == 0:
        raise ValueError("logits must hold at least one row")
    labels = class_labels(labels, "labels", num_rows=num_rows, xp=xp)
    return -xp.mean(pick_columns(log_softmax(values, xp=xp), labels, xp=xp))


@fill_doc
def binary_kl_norm(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 2.0, xp: Any = None
) -> Array:
    r"""BinaryKL-Norm: the logit-level loss of dual-head distillation.

    Each class logit is compared with the teacher's through a Bernoulli variable: with
    :math:`d_{nc} = (s_{nc} - t_{nc}) / T`,

    .. math::

       L = \frac{T^2}{N} \sum_{n,c} \mathrm{KL}\bigl(\mathrm{Bern}(\tfrac12) \,\big\|\,
           \mathrm{Bern}(\sigma(d_{nc}))\bigr)
         = \frac{T^2}{N} \sum_{n,c} \Bigl(-\log 2 + \tfrac12 |d_{nc}|
           + \log\bigl(1 + e^{-|d_{nc}|}\bigr)\Bigr),

    zero exactly when the student's logits equal the teacher's (logit matching); its gradient
    :math:`\frac{T}{2N}\tanh(d/2)` is bounded. The right-hand form is the one computed: it has no
    ``log`` of a probability, so it stays finite and exact for any finite logits. The official
    code clamps :math:`\sigma(d)` to ``[1e-8, 1 - 1e-8]`` instead, which caps each term (and zeroes
    its gradient) once :math:`|d| > 18.4`; below that the two agree to float32 rounding.

    Parameters
    ----------
    student_logits : array (N, C)
        Logits of the student's auxiliary head.
    teacher_logits : array (N, C)
        Teacher logits (pass them without a gradient).
    temperature : float
        :math:`T > 0`; the official CIFAR-100 recipe uses 2 (``--BinaryKL_T 2``), the default.
    %(xp)s

    Returns
    -------
    array ()
        float32 scalar, summed over classes and averaged over rows.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> teacher = xp.asarray([[2.0, -1.0, 0.5]])
    >>> float(mr.distillation.binary_kl_norm(teacher, teacher))
    0.0
    >>> round(float(mr.distillation.binary_kl_norm(teacher + 1.0, teacher)), 4)
    0.3712
    """
    xp = namespace(student_logits, teacher_logits, xp=xp)
    student, teacher = _pair(student_logits, teacher_logits, xp=xp)
    scale = check_real(temperature, "temperature", positive=True)
    gap = xp.abs(student - teacher) / scale
    terms = 0.5 * gap + xp.log1p(xp.exp(-gap)) - math.log(2.0)
    return scale**2 * xp.sum(terms) / student.shape[0]


@fill_doc
def binary_kl(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 2.0, xp: Any = None
) -> Array:
    r"""BinaryKL: per-class Bernoulli KL from the teacher to the student.

    .. math::

       L = \frac{T^2}{N} \sum_{n,c} \mathrm{KL}\bigl(\mathrm{Bern}(\sigma(t_{nc}/T)) \,\big\|\,
           \mathrm{Bern}(\sigma(s_{nc}/T))\bigr).

    The official code ships it beside :func:`binary_kl_norm` but its ``dhkd`` recipe uses
    BinaryKL-Norm; this one is provided for comparison. Computed with stable log-sigmoids (no
    clamping, unlike the official code's ``eps = 1e-8``).

    Parameters
    ----------
    student_logits, teacher_logits : array (N, C)
        As in :func:`binary_kl_norm`.
    temperature : float
        :math:`T > 0`.
    %(xp)s

    Returns
    -------
    array ()
        float32 scalar :math:`L \geq 0`, the :math:`T^2` factor included.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> teacher = xp.asarray([[2.0, -1.0]])
    >>> float(mr.distillation.binary_kl(teacher, teacher))
    0.0
    """
    xp = namespace(student_logits, teacher_logits, xp=xp)
    student, teacher = _pair(student_logits, teacher_logits, xp=xp)
    scale = check_real(temperature, "temperature", positive=True)
    student, teacher = student / scale, teacher / scale
    log_p, log_not_p = log_sigmoid(teacher, xp=xp), log_sigmoid(-teacher, xp=xp)
    log_q, log_not_q = log_sigmoid(student, xp=xp), log_sigmoid(-student, xp=xp)
    terms = xp.exp(log_p) * (log_p - log_q) + xp.exp(log_not_p) * (log_not_p - log_not_q)
    return scale**2 * xp.sum(terms) / student.shape[0]


@fill_doc
def dual_head_loss(
    main_logits: Array,
    aux_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 2.0,
    xp: Any = None,
) -> Array:
    r"""The dual-head distillation objective: CE on the main head, BinaryKL-Norm on the aux head.

    .. math::

       L = \gamma \, \mathrm{CE}(z^{\mathrm{main}}, y)
         + \alpha \, \mathrm{BinaryKLNorm}_T(z^{\mathrm{aux}}, z^{\mathrm{teacher}}),

    as ``helper/loops.py::train_distill`` computes it for ``--distill dhkd`` (``-r`` is
    :math:`\gamma`, ``-a`` is :math:`\alpha`). There is no softmax-KL term on the main head in
    that code path. Both heads read the same backbone features; only the main head is used at
    inference. To also apply the official ``--ga`` gradient alignment, take the two terms'
    gradients separately and combine them with :func:`align_gradients`.

    Parameters
    ----------
    main_logits : array (N, K)
        Main head logits (trained with labels, used at inference).
    aux_logits : array (N, K)
        Auxiliary head logits (trained against the teacher, discarded at inference).
    teacher_logits : array (N, K)
        Teacher logits, passed without a gradient.
    %(labels)s
    ce_weight : float
        :math:`\gamma`; the CIFAR-100 recipe uses 1.
    kd_weight : float
        :math:`\alpha`; 1 on CIFAR-100, 0.1 on ImageNet in the official scripts.
    temperature : float
        :math:`T` of :func:`binary_kl_norm`.
    %(xp)s

    Returns
    -------
    array ()
        float32 scalar :math:`L`, the weighted sum of the two heads' terms.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> teacher = xp.asarray([[3.0, 0.0], [0.0, 3.0]])
    >>> main = xp.asarray([[0.0, 0.0], [0.0, 0.0]])
    >>> loss = mr.distillation.dual_head_loss(main, teacher, teacher, xp.asarray([0, 1]))
    >>> round(float(loss), 6)  # CE of flat logits; the aux head already matches the teacher
    0.693147
    """
    xp = namespace(main_logits, aux_logits, teacher_logits, labels, xp=xp)
    gamma = check_real(ce_weight, "ce_weight")
    alpha = check_real(kd_weight, "kd_weight")
    main = float_array(main_logits, "main_logits", ndim=(2,), xp=xp)
    check_shape(aux_logits, "aux_logits", tuple(main.shape))
    supervised = cross_entropy(main, labels, xp=xp)
    matched = binary_kl_norm(aux_logits, teacher_logits, temperature=temperature, xp=xp)
    return gamma * supervised + alpha * matched


def align_gradients(gradients: Array, *, xp: Any = None) -> Array:
    r"""Gradient alignment of dual-head distillation (PCGrad-style projection onto the CE one).

    Row 0 of ``gradients`` is the flattened gradient of the cross-entropy term :math:`g_0`; every
    other row :math:`g_i` (the logit-level loss's) that conflicts with it loses its component
    along it, and the rows are summed:

    .. math::

       g_i \leftarrow g_i - \frac{\min(g_i \cdot g_0,\, 0)}{\lVert g_0 \rVert^2}\, g_0,
       \qquad g = \sum_i g_i .

    This is ``helper/optimizer.py::OptimGradAlign._project_conflicting`` of the official code
    (``--ga``), where every objective is projected onto the first one only. A zero :math:`g_0`
    leaves every row unchanged.

    Parameters
    ----------
    gradients : array (L, P)
        One flattened parameter gradient per loss term, the cross-entropy term first.
    xp : namespace, optional
        Array namespace; inferred from ``gradients`` when None.

    Returns
    -------
    array (P,)
        float32 combined gradient.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> grads = xp.asarray([[1.0, 0.0], [-1.0, 1.0]])  # the second conflicts with the first
    >>> mr.distillation.align_gradients(grads)
    Array([1., 1.], dtype=array_api_strict.float32)
    """
    xp = namespace(gradients, xp=xp)
    rows = float_array(gradients, "gradients", ndim=(2,), xp=xp)
    if rows.shape[0] < 1:
        raise ValueError("gradients must hold at least one row")
    reference = rows[0, :]
    norm_squared = xp.sum(reference * reference)
    safe_norm = xp.where(norm_squared > 0, norm_squared, xp.ones_like(norm_squared))
    overlap = xp.sum(rows * reference[None, :], axis=1)
    conflict = xp.where(overlap < 0, overlap, xp.zeros_like(overlap)) / safe_norm
    return xp.sum(rows - conflict[:, None] * reference[None, :], axis=0)


def _pair(student_logits: Array, teacher_logits: Array, *, xp: Any) -> tuple[Array, Array]:
    student = float_array(student_logits, "student_logits", ndim=(2,), xp=xp)
    teacher = float_array(teacher_logits, "teacher_logits", ndim=(2,), xp=xp)
    check_shape(teacher, "teacher_logits", tuple(student.shape))
    if student.shape[0] == 0:
        raise ValueError("student_logits must hold at least one row")
    return student, teacher
