"""Argument checks and stable float32 primitives shared by the policies and the method modules.

:mod:`moerouter.confidence`, :mod:`moerouter.distillation` and :mod:`moerouter.multitask` take plain
arrays (logits, labels, expert outputs, masks) rather than a :class:`~moerouter.Routing`; these
helpers give every one of them the same checks and the same numerically stable building blocks.
:func:`sigmoid`, :func:`log_sigmoid` and :func:`softplus` are the only forms of those functions
in moerouter: the policies (sigmoid scores, the noisy top-k scale) use them too. Private helpers
require ``xp``.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._arrays import device_of

Array = Any


def namespace(*arrays: Any, xp: Any) -> Any:
    """``xp`` if given, else the common namespace of ``arrays`` (mixed backends raise)."""
    if xp is not None:
        return xp
    try:
        return array_namespace(*arrays)
    except TypeError as error:  # mixed backends, or a non-array
        raise TypeError(f"all arrays must come from one array library: {error}") from None


def check_array(value: object, name: str) -> None:
    if not is_array_api_obj(value):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")


def float_array(value: Any, name: str, *, ndim: tuple[int, ...], xp: Any) -> Array:
    """``value`` checked to be a real floating array of one of ``ndim`` ranks, as float32."""
    check_array(value, name)
    if value.ndim not in ndim:
        ranks = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {ranks} dimensions, got shape {tuple(value.shape)}")
    if not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    return xp.astype(value, xp.float32)


def bool_array(value: Any, name: str, *, shape: tuple[int, ...], xp: Any) -> Array:
    """``value`` checked to be a bool array of ``shape``."""
    check_array(value, name)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype != xp.bool:
        raise TypeError(f"{name} must be a bool array, got {value.dtype}")
    return value


def check_shape(value: Any, name: str, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")


def class_labels(labels: Any, name: str, *, num_rows: int, xp: Any) -> Array:
    """Integer labels of shape ``(num_rows,)``.

    Their range is not checked here: that would cost a host synchronisation (and a graph break
    under ``torch.compile``) on every call. :func:`pick_columns` turns an out-of-range label into
    a NaN instead, so a bad label shows in the loss without a sync.
    """
    check_array(labels, name)
    if tuple(labels.shape) != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},), got {tuple(labels.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array, got {labels.dtype}")
    return labels


def check_real(value: object, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        condition = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {condition}, got {value}")
    return float(value)


def log_softmax(values: Array, *, xp: Any) -> Array:
    """Row-wise log-softmax over the last axis, max-shifted so no ``exp`` overflows."""
    shifted = values - xp.max(values, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def _exp_minus_abs(values: Array, *, xp: Any) -> Array:
    """:math:`e^{-|x|}` in (0, 1]; at x = 0 the gradient comes from the x >= 0 side.

    ``where`` rather than ``abs``: the gradient of ``abs`` at 0 is 0 on torch and JAX, which
    would zero the slope of every function built on this at x = 0.
    """
    return xp.exp(xp.where(values >= 0, -values, values))


def softplus(values: Array, *, xp: Any) -> Array:
    r""":math:`\log(1 + e^{x}) = \max(x, 0) + \log(1 + e^{-|x|})`.

    Value and gradient finite for every finite x (no ``exp`` of a positive number); the value
    is ``+inf`` at ``+inf`` with slope 1, and 0 at ``-inf`` with slope 0.
    """
    positive = xp.where(values >= 0, values, xp.zeros_like(values))
    return positive + xp.log1p(_exp_minus_abs(values, xp=xp))


def log_sigmoid(values: Array, *, xp: Any) -> Array:
    r""":math:`\log\sigma(x) = \min(x, 0) - \log(1 + e^{-|x|})`, finite for every finite x."""
    negative = xp.where(values >= 0, xp.zeros_like(values), values)
    return negative - xp.log1p(_exp_minus_abs(values, xp=xp))


def sigmoid(values: Array, *, xp: Any) -> Array:
    r""":math:`\sigma(x) = 1 / (1 + e^{-x})`, the one stable form every moerouter module uses.

    With :math:`z = e^{-|x|} \in (0, 1]`: :math:`1 / (1 + z)` for :math:`x \ge 0` and
    :math:`z / (1 + z)` below. No ``exp`` overflows, so value and gradient are finite for every
    finite x (the naive ``1 / (1 + exp(-x))`` has a NaN gradient below about -88.7 in float32,
    where ``exp(-x)`` is ``inf``); :math:`\sigma(\pm\infty)` is 1 and 0 with slope 0.
    """
    z = _exp_minus_abs(values, xp=xp)
    return xp.where(values >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def pick_columns(values: Array, columns: Array, *, xp: Any) -> Array:
    """``values[n, columns[n]]`` for a ``(N, K)`` array, as ``(N,)``; NaN where out of range."""
    # A one-hot mask rather than a gather: no index dtype to negotiate (torch gathers int64 only,
    # JAX without x64 has no int64), and the gradient is a plain masked copy.
    classes = xp.arange(values.shape[-1], dtype=columns.dtype, device=device_of(values))
    hit = classes[None, :] == columns[:, None]
    picked = xp.sum(xp.where(hit, values, xp.zeros_like(values)), axis=-1)
    return xp.where(xp.any(hit, axis=-1), picked, xp.full_like(picked, xp.nan))
