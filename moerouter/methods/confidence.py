r"""Mowst: a confidence gate between a weak and a strong expert (Zeng et al., ICLR 2024).

Mixture of weak and strong experts (H. Zeng, H. Lyu, D. Hu, Y. Xia, J. Luo, "Mixture of Weak &
Strong Experts on Graphs", ICLR 2024, arXiv:2311.05185). A light weak expert (an MLP on a node's
own features) predicts first; a confidence :math:`C \in [0, 1]` computed from the **dispersion of
its own prediction** decides how much the strong expert (a GNN) is needed. Unlike a token router,
the gate's input is an expert's output distribution, not the token's features.

Pieces, each a pure function of arrays:

- :func:`dispersion`: the two dispersion features of the weak prediction (variance and negative
  entropy, both normalised to ``[0, 1]``);
- :func:`power_confidence` (:math:`C = D^\alpha`) and :func:`mlp_confidence`
  (:math:`C = \sigma(\mathrm{MLP}(D))`): the two confidence functions;
- :func:`weighted_loss` (Mowst's training loss) and :func:`mixed_logits_loss` (Mowst*);
- :func:`predict` (Mowst's sampled inference, with the uniform draws an explicit input) and
  :func:`predict_mixed` (Mowst*'s).

Verified against the official code (``facebookresearch/mowst-gnn`` @ 2e356996,
``train_test_engine.py``: ``compute_confidence``, ``train_simple_gate``, ``eval_for_multi``,
``train_mowst1``). The paper's exact form of the learnable-power confidence is UNVERIFIED (the
paper body could not be read; the code's legacy path raises the variance dispersion to a power).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from moerouter._agnostic.scores import log_softmax, sigmoid
from moerouter._agnostic.select import pick_columns
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_array,
    check_real,
    check_shape,
    class_labels,
    float_array,
    namespace,
)

__all__ = [
    "dispersion",
    "mixed_logits_loss",
    "mlp_confidence",
    "power_confidence",
    "predict",
    "predict_mixed",
    "weighted_loss",
]


def dispersion(weak_logits: Array, *, xp: Any = None) -> Array:
    r"""Dispersion of the weak expert's prediction: ``[variance, negative entropy]`` per row.

    With :math:`p = \mathrm{softmax}(z)` over :math:`K \ge 2` classes,

    .. math::

       D_{\mathrm{var}}(p) = \frac{\mathrm{Var}_c(p_c)}{\mathrm{Var}_c(\mathrm{onehot})}
                           = \frac{K^2}{K - 1}\,\mathrm{Var}_c(p_c), \qquad
       D_{\mathrm{ent}}(p) = 1 - \frac{H(p)}{\log K},

    with the population variance over classes and :math:`H(p) = -\sum_c p_c \log p_c`. Both are
    0 for a uniform prediction and 1 for a one-hot one. This is ``compute_confidence`` of the
    official code (methods ``"variance"`` and ``"entropy"``), concatenated in that order as
    ``train_simple_gate`` does. The official code computes it under ``torch.no_grad()``, so the
    weak expert is not trained through the gate: pass detached logits to reproduce that.

    Parameters
    ----------
    weak_logits : array (N, K)
        The weak expert's class logits, any real floating dtype, ``K >= 2``.
    xp : namespace, optional
        Array namespace; inferred from ``weak_logits`` when None.

    Returns
    -------
    array (N, 2)
        float32; column 0 is :math:`D_{\mathrm{var}}`, column 1 is :math:`D_{\mathrm{ent}}`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> features = mr.confidence.dispersion(xp.asarray([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]))
    >>> xp.round(features * 1e4) / 1e4  # uniform: 0; one-hot: 1 (to float32 rounding)
    Array([[0., 0.],
           [1., 1.]], dtype=array_api_strict.float32)
    """
    xp = namespace(weak_logits, xp=xp)
    logits = _logits(weak_logits, "weak_logits", xp=xp)
    num_classes = int(logits.shape[1])
    log_probs = log_softmax(logits, xp=xp)
    probs = xp.exp(log_probs)
    centred = probs - 1.0 / num_classes
    variance = xp.mean(centred * centred, axis=1)
    var_dispersion = variance * (num_classes**2 / (num_classes - 1))
    entropy = -xp.sum(probs * log_probs, axis=1)
    ent_dispersion = 1.0 - entropy / math.log(num_classes)
    return xp.stack([var_dispersion, ent_dispersion], axis=1)


@fill_doc
def power_confidence(
    weak_logits: Array,
    alpha: float | Array,
    *,
    measure: Literal["variance", "entropy"] = "variance",
    xp: Any = None,
) -> Array:
    r"""The simple confidence :math:`C = D(p)^{\alpha}` with a (learnable) power :math:`\alpha`.

    :math:`D` is one column of :func:`dispersion` (the variance one by default, as the official
    code's legacy path ``compute_confidence(...) ** args.alpha``). A larger :math:`\alpha` lowers
    :math:`C` everywhere, biasing toward the strong expert. Pass ``alpha`` as a 0-d array with a
    gradient to learn it.

    **UNVERIFIED:** the paper's exact formula for its "learnable power" confidence could not be
    read; this form is the one in the official code's ``train_mowst1/2`` and ``test_mowst``
    (which ``main.py`` no longer calls).

    Parameters
    ----------
    weak_logits : array (N, K)
        The weak expert's class logits, ``K >= 2``.
    alpha : float or array ()
        Power :math:`\alpha > 0`.
    measure : {"variance", "entropy"}
        Which dispersion to raise to the power.
    %(xp)s

    Returns
    -------
    array (N,)
        float32 confidence in ``[0, 1]``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[2.0, 0.0], [0.0, 0.0]])
    >>> mr.confidence.power_confidence(logits, 2.0)
    Array([0.3364..., 0.       ], dtype=array_api_strict.float32)
    """
    if measure not in ("variance", "entropy"):
        raise ValueError(f"measure must be 'variance' or 'entropy', got {measure!r}")
    if isinstance(alpha, int | float) and not isinstance(alpha, bool):
        power: Any = check_real(alpha, "alpha", positive=True)
        xp = namespace(weak_logits, xp=xp)
    else:
        check_array(alpha, "alpha")
        if alpha.ndim != 0:
            raise ValueError(f"alpha must be a number or a 0-d array, got shape {alpha.shape}")
        xp = namespace(weak_logits, alpha, xp=xp)
        power = xp.astype(alpha, xp.float32)
    features = dispersion(weak_logits, xp=xp)
    column = features[:, 0] if measure == "variance" else features[:, 1]
    # Rounding can leave a one-hot row a hair above 1 or a uniform row a hair below 0.
    column = xp.clip(column, 0.0, 1.0)
    # exp(alpha log D) where D > 0 and exactly 0 elsewhere: D ** alpha would give a learnable
    # alpha the gradient 0 * log 0 = NaN on uniform rows.
    positive = column > 0
    log_column = xp.log(xp.where(positive, column, xp.ones_like(column)))
    return xp.where(positive, xp.exp(power * log_column), xp.zeros_like(column))


@fill_doc
def mlp_confidence(
    weak_logits: Array,
    layers: Sequence[tuple[Array, Array]],
    *,
    node_features: Array | None = None,
    xp: Any = None,
) -> Array:
    r"""The learned confidence :math:`C = \sigma(\mathrm{MLP}(D))` of a small gate MLP.

    The gate MLP reads the two :func:`dispersion` features, optionally followed by the node's own
    features (the official ``--original_data true``):
    :math:`h_0 = [D_{\mathrm{var}}, D_{\mathrm{ent}}] \oplus x`,
    :math:`h_{i+1} = \mathrm{ReLU}(h_i W_i + b_i)` for every layer but the last, and
    :math:`C = \sigma(h_{L-1} W_{L-1} + b_{L-1})`.

    The official ``GateMLP`` also has batch-norm and dropout between layers. Dropout is a
    training-time choice left to the caller; an inference-mode batch-norm is an affine map that
    folds into the preceding layer's ``(W, b)``. The weights are given arrays: this function holds
    no parameters.

    Parameters
    ----------
    weak_logits : array (N, K)
        The weak expert's class logits, ``K >= 2``.
    layers : sequence of (array (F_in, F_out), array (F_out,))
        ``(weight, bias)`` of each linear layer in order; the first has
        ``F_in = 2 + node_features.shape[1]`` (or 2), the last ``F_out = 1``.
    node_features : array (N, F), optional
        Features appended after the dispersion.
    %(xp)s

    Returns
    -------
    array (N,)
        float32 confidence in ``(0, 1)``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> weight, bias = xp.asarray([[4.0], [0.0]]), xp.asarray([-2.0])  # sigmoid(4 D_var - 2)
    >>> mr.confidence.mlp_confidence(xp.asarray([[9.0, 0.0], [0.0, 0.0]]), [(weight, bias)])
    Array([0.8805..., 0.1192...], dtype=array_api_strict.float32)
    """
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise TypeError("layers must be a non-empty sequence of (weight, bias) pairs")
    arrays = [weak_logits] + [a for layer in layers for a in _layer(layer)]
    if node_features is not None:
        arrays.append(node_features)
    xp = namespace(*arrays, xp=xp)
    hidden = dispersion(weak_logits, xp=xp)
    if node_features is not None:
        extra = float_array(node_features, "node_features", ndim=(2,), xp=xp)
        check_shape(extra, "node_features", (hidden.shape[0], extra.shape[1]))
        hidden = xp.concat([hidden, extra], axis=1)
    for index, (weight, bias) in enumerate(layers):
        name = f"layers[{index}]"
        weight = float_array(weight, f"{name} weight", ndim=(2,), xp=xp)
        bias = float_array(bias, f"{name} bias", ndim=(1,), xp=xp)
        if weight.shape[0] != hidden.shape[1]:
            raise ValueError(
                f"{name} weight has {weight.shape[0]} input rows, but its input has "
                f"{hidden.shape[1]} features"
            )
        check_shape(bias, f"{name} bias", (weight.shape[1],))
        hidden = xp.matmul(hidden, weight) + bias
        if index < len(layers) - 1:
            hidden = xp.maximum(hidden, xp.zeros_like(hidden))
    if hidden.shape[1] != 1:
        raise ValueError(f"the last layer must have 1 output, got {hidden.shape[1]}")
    return sigmoid(hidden[:, 0], xp=xp)


@fill_doc
def weighted_loss(
    weak_logits: Array,
    strong_logits: Array,
    labels: Array,
    confidence: Array,
    *,
    xp: Any = None,
) -> Array:
    r"""Mowst's confidence-weighted training loss.

    .. math::

       L = \frac{1}{N} \sum_v \Bigl[ C_v \,\mathrm{CE}(z^{\mathrm{weak}}_v, y_v)
           + (1 - C_v)\,\mathrm{CE}(z^{\mathrm{strong}}_v, y_v) \Bigr].

    Official code (``--subloss separate``, ``MowstEngine``) minimises it **in turns**: the weak
    turn updates the weak expert and the gate with the strong logits computed without gradient;
    the strong turn updates the strong expert with :math:`C` and the weak logits fixed. Which
    arrays carry a gradient in each turn is the caller's choice; this function is one loss.

    Parameters
    ----------
    weak_logits, strong_logits : array (N, K)
        Class logits of the weak and the strong expert.
    %(labels)s
    confidence : array (N,)
        :math:`C`, from :func:`power_confidence` or :func:`mlp_confidence`.
    %(xp)s

    Returns
    -------
    array ()
        float32 scalar :math:`L`, averaged over the ``N`` rows.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> weak, strong = xp.asarray([[0.0, 0.0]]), xp.asarray([[0.0, 9.0]])
    >>> loss = mr.confidence.weighted_loss(weak, strong, xp.asarray([1]), xp.asarray([1.0]))
    >>> round(float(loss), 6)  # C = 1: only the weak expert's CE, log 2
    0.693147
    """
    xp = namespace(weak_logits, strong_logits, labels, confidence, xp=xp)
    weak, strong, gate = _experts(weak_logits, strong_logits, confidence, xp=xp)
    labels = class_labels(labels, "labels", num_rows=int(weak.shape[0]), xp=xp)
    weak_nll = -pick_columns(log_softmax(weak, xp=xp), labels, xp=xp)
    strong_nll = -pick_columns(log_softmax(strong, xp=xp), labels, xp=xp)
    return xp.mean(gate * weak_nll + (1.0 - gate) * strong_nll)


@fill_doc
def mixed_logits_loss(
    weak_logits: Array,
    strong_logits: Array,
    labels: Array,
    confidence: Array,
    *,
    xp: Any = None,
) -> Array:
    r"""Mowst*'s loss: cross-entropy of the confidence-mixed **logits**.

    :math:`L = \frac{1}{N}\sum_v \mathrm{CE}\bigl(C_v z^{\mathrm{weak}}_v + (1 - C_v)
    z^{\mathrm{strong}}_v,\ y_v\bigr)`, one optimiser over both experts and the gate
    (official ``--subloss joint``, ``MowstStarEngine``).

    Parameters
    ----------
    weak_logits, strong_logits : array (N, K)
        Class logits of the weak and the strong expert.
    %(labels)s
    confidence : array (N,)
        :math:`C`.
    %(xp)s

    Returns
    -------
    array ()
        float32 scalar :math:`L`: one cross-entropy of the mixed logits per row, averaged.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> weak, strong = xp.asarray([[2.0, 0.0]]), xp.asarray([[-2.0, 0.0]])
    >>> loss = mr.confidence.mixed_logits_loss(weak, strong, xp.asarray([0]), xp.asarray([0.5]))
    >>> round(float(loss), 6)  # the mixed logits are flat
    0.693147
    """
    xp = namespace(weak_logits, strong_logits, labels, confidence, xp=xp)
    weak, strong, gate = _experts(weak_logits, strong_logits, confidence, xp=xp)
    labels = class_labels(labels, "labels", num_rows=int(weak.shape[0]), xp=xp)
    mixed = gate[:, None] * weak + (1.0 - gate[:, None]) * strong
    return -xp.mean(pick_columns(log_softmax(mixed, xp=xp), labels, xp=xp))


@fill_doc
def predict(
    weak_logits: Array,
    strong_logits: Array,
    confidence: Array,
    *,
    uniform: Array | None = None,
    threshold: float | None = None,
    xp: Any = None,
) -> tuple[Array, Array]:
    r"""Mowst's inference rule: the weak expert's class where it is trusted, else the strong one's.

    Give exactly one of

    - ``uniform`` (the paper's and the official code's rule, ``eval_for_multi``): draws
      :math:`u_v \sim U(0, 1)` made by the caller; node :math:`v` uses the weak expert when
      :math:`u_v < C_v`, so with probability :math:`C_v`. Randomness is an explicit input, so the
      result is reproducible and identical on every backend for the same draws. The official
      evaluation averages accuracy over 50 such draws.
    - ``threshold`` :math:`\tau` (a deterministic variant, not in the paper's evaluation): the weak
      expert where :math:`C_v \ge \tau`.

    The strong expert's prediction is needed only where ``use_weak`` is False: that is where
    Mowst saves compute. Ties in ``argmax`` go to the lower class index.

    Parameters
    ----------
    weak_logits, strong_logits : array (N, K)
        Class logits (or probabilities: argmax is the same) of the two experts.
    confidence : array (N,)
        :math:`C`.
    uniform : array (N,), optional
        Uniform draws in ``[0, 1)``, any real floating dtype.
    threshold : float, optional
        :math:`\tau \in [0, 1]`.
    %(xp)s

    Returns
    -------
    predictions : array (N,)
        int32 predicted class.
    use_weak : array (N,)
        bool, True where the weak expert's class was used.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> weak, strong = xp.asarray([[3.0, 0.0], [3.0, 0.0]]), xp.asarray([[0.0, 1.0], [0.0, 1.0]])
    >>> confidence, draws = xp.asarray([0.9, 0.2]), xp.asarray([0.5, 0.5])
    >>> predictions, use_weak = mr.confidence.predict(weak, strong, confidence, uniform=draws)
    >>> predictions
    Array([0, 1], dtype=array_api_strict.int32)
    >>> use_weak
    Array([ True, False], dtype=array_api_strict.bool)
    """
    if (uniform is None) == (threshold is None):
        raise ValueError("give exactly one of uniform (sampled rule) or threshold")
    arrays = [weak_logits, strong_logits, confidence] + ([uniform] if uniform is not None else [])
    xp = namespace(*arrays, xp=xp)
    weak, strong, gate = _experts(weak_logits, strong_logits, confidence, xp=xp)
    if uniform is not None:
        draws = float_array(uniform, "uniform", ndim=(1,), xp=xp)
        check_shape(draws, "uniform", tuple(gate.shape))
        use_weak = draws < gate
    else:
        tau = check_real(threshold, "threshold")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {tau}")
        use_weak = gate >= tau
    chosen = xp.where(use_weak[:, None], weak, strong)
    return xp.astype(xp.argmax(chosen, axis=1), xp.int32), use_weak


@fill_doc
def predict_mixed(
    weak_logits: Array, strong_logits: Array, confidence: Array, *, xp: Any = None
) -> Array:
    r"""Mowst*'s inference rule: argmax of the confidence-mixed **probabilities**.

    :math:`\hat y_v = \arg\max_c \bigl(C_v\, p^{\mathrm{weak}}_{vc} + (1 - C_v)\,
    p^{\mathrm{strong}}_{vc}\bigr)` with :math:`p = \mathrm{softmax}(z)`, as the official
    ``eval_for_simplicity`` does (training mixes logits, evaluation mixes probabilities). Ties go
    to the lower class index.

    Parameters
    ----------
    weak_logits, strong_logits : array (N, K)
        Class logits of the two experts.
    confidence : array (N,)
        :math:`C`.
    %(xp)s

    Returns
    -------
    array (N,)
        int32 predicted class.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> weak, strong = xp.asarray([[3.0, 0.0]]), xp.asarray([[0.0, 3.0]])
    >>> mr.confidence.predict_mixed(weak, strong, xp.asarray([0.75]))
    Array([0], dtype=array_api_strict.int32)
    """
    xp = namespace(weak_logits, strong_logits, confidence, xp=xp)
    weak, strong, gate = _experts(weak_logits, strong_logits, confidence, xp=xp)
    weak_probs = xp.exp(log_softmax(weak, xp=xp))
    strong_probs = xp.exp(log_softmax(strong, xp=xp))
    mixed = gate[:, None] * weak_probs + (1.0 - gate[:, None]) * strong_probs
    return xp.astype(xp.argmax(mixed, axis=1), xp.int32)


def _logits(value: Array, name: str, *, xp: Any) -> Array:
    logits = float_array(value, name, ndim=(2,), xp=xp)
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one row")
    return logits


def _experts(
    weak_logits: Array, strong_logits: Array, confidence: Array, *, xp: Any
) -> tuple[Array, Array, Array]:
    weak = _logits(weak_logits, "weak_logits", xp=xp)
    strong = float_array(strong_logits, "strong_logits", ndim=(2,), xp=xp)
    check_shape(strong, "strong_logits", tuple(weak.shape))
    gate = float_array(confidence, "confidence", ndim=(1,), xp=xp)
    check_shape(gate, "confidence", (weak.shape[0],))
    return weak, strong, gate


def _layer(layer: object) -> tuple[Any, Any]:
    if not isinstance(layer, tuple | list) or len(layer) != 2:
        raise TypeError("every entry of layers must be a (weight, bias) pair")
    return layer[0], layer[1]
