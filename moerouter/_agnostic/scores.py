r"""Router scores, written once: softmax, sigmoid and their logs, in forms that stay finite.

Every score in moerouter (a policy's probabilities, a loss's log-probabilities, a method's gates)
comes from here, so that each has one numerically checked form:

- no ``exp`` of a positive number: softmaxes are max-shifted, and the sigmoid family goes
  through :math:`e^{-|x|} \in (0, 1]`, so value and gradient are finite for every finite input
  (the naive ``1 / (1 + exp(-x))`` has a NaN gradient below about -88.7 in float32);
- a row whose every entry is -inf (a fully masked row) never evaluates ``-inf - -inf``.

Also here: :func:`to_float32` and :func:`finite_rows`, how logits become the float32 values the
scores are computed from. Private helpers: ``xp`` is a required keyword.
"""

from __future__ import annotations

from moerouter._typing import Array, Device, Namespace

__all__ = [
    "finite_rows",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "masked_softmax",
    "renormalize",
    "sigmoid",
    "softmax",
    "softplus",
    "to_float32",
]


def to_float32(values: Array, *, xp: Namespace) -> Array:
    """``values`` as float32, finite values beyond float32's range saturated to its largest.

    A plain cast turns a float64 1e39 into inf, and its row would then route nowhere although
    every entry is finite. Saturated, the row stays routable and keeps its order, except that
    entries beyond the range tie at the largest float32 (ties go to the lower index). -inf (a
    mask), +inf and NaN (non-finite rows) keep their meaning.
    """
    largest = float(xp.finfo(xp.float32).max)
    if float(xp.finfo(values.dtype).max) > largest:
        saturated = xp.clip(values, min=-largest, max=largest)
        values = xp.where(xp.isfinite(values), saturated, values)
    return xp.astype(values, xp.float32)


def finite_rows(values: Array, *, xp: Namespace) -> Array:
    """Rows that can be routed: no NaN, no +inf, and at least one entry above -inf."""
    no_nan_or_inf = xp.all(xp.isfinite(values) | (values == -xp.inf), axis=-1)
    return no_nan_or_inf & xp.any(values > -xp.inf, axis=-1)


def softmax(values: Array, *, xp: Namespace) -> Array:
    """Row-wise softmax over the last axis, max-shifted so no ``exp`` overflows."""
    shifted = values - xp.max(values, axis=-1, keepdims=True)
    exp = xp.exp(shifted)
    return exp / xp.sum(exp, axis=-1, keepdims=True)


def log_softmax(values: Array, *, xp: Namespace) -> Array:
    """Row-wise log-softmax over the last axis, max-shifted so no ``exp`` overflows.

    A row whose maximum is -inf is shifted by 0 rather than by -inf, so ``-inf - -inf`` (NaN in
    the value and the gradient of the shift) is never evaluated; such a row has no
    log-probabilities either way.
    """
    peak = xp.max(values, axis=-1, keepdims=True)
    peak = xp.where(peak > -xp.inf, peak, xp.zeros_like(peak))
    shifted = values - peak
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def logsumexp(values: Array, *, axis: int, xp: Namespace) -> Array:
    """``log(sum(exp(values)))`` along ``axis`` (kept), -inf where every entry is -inf."""
    if values.shape[axis] == 0:  # a sum of nothing (no tokens): log 0 = -inf, without max()
        return xp.full_like(xp.sum(values, axis=axis, keepdims=True), -xp.inf)
    top = xp.max(values, axis=axis, keepdims=True)
    reachable = top > -xp.inf
    finite_top = xp.where(reachable, top, xp.zeros_like(top))
    total = xp.sum(xp.exp(values - finite_top), axis=axis, keepdims=True)
    # log(0) is never evaluated: NumPy would warn, and the gradient would be NaN.
    total = xp.where(reachable, total, xp.ones_like(total))
    return xp.where(reachable, xp.log(total) + finite_top, top)


def renormalize(weights: Array, mask: Array, *, xp: Namespace) -> Array:
    """``weights`` zeroed outside ``mask``, divided by their row sum (a zero row stays zero)."""
    weights = xp.where(mask, weights, xp.zeros_like(weights))
    total = xp.sum(weights, axis=-1, keepdims=True)
    return weights / xp.where(total > 0, total, xp.ones_like(total))


def masked_softmax(values: Array, mask: Array | None, *, xp: Namespace, device: Device) -> Array:
    """Softmax over the masked-in entries of each row; all-zero for a row with none.

    Masked-out entries never reach ``exp``, so they get no gradient (AdaMoE's null logits).
    ``mask=None`` (every entry in) skips the masking pass; the values are the same bits.
    """
    if values.shape[-1] == 0:  # rows of no entries (Soft MoE's slots over zero tokens)
        return xp.zeros_like(values)
    lowest = xp.asarray(-xp.inf, dtype=values.dtype, device=device)
    masked = values if mask is None else xp.where(mask, values, lowest)
    row_max = xp.max(masked, axis=-1, keepdims=True)
    row_max = xp.where(row_max > -xp.inf, row_max, xp.zeros_like(row_max))
    # exp(-inf - row_max) is exactly 0 (and so is its gradient): no second mask is needed, and
    # the values equal those of masking after exp, bit for bit. The sum is at least 1 (the
    # maximum's term) unless the row has no finite entry.
    exp = xp.exp(masked - row_max)
    total = xp.sum(exp, axis=-1, keepdims=True)
    return exp / xp.where(total > 0, total, xp.ones_like(total))


def _exp_minus_abs(values: Array, *, xp: Namespace) -> Array:
    """:math:`e^{-|x|}` in (0, 1]; at x = 0 the gradient comes from the x >= 0 side.

    ``where`` rather than ``abs``: the gradient of ``abs`` at 0 is 0 on torch and JAX, which
    would zero the slope of every function built on this at x = 0.
    """
    return xp.exp(xp.where(values >= 0, -values, values))


def softplus(values: Array, *, xp: Namespace) -> Array:
    r""":math:`\log(1 + e^{x}) = \max(x, 0) + \log(1 + e^{-|x|})`.

    Value and gradient finite for every finite x (no ``exp`` of a positive number); the value
    is ``+inf`` at ``+inf`` with slope 1, and 0 at ``-inf`` with slope 0.
    """
    positive = xp.where(values >= 0, values, xp.zeros_like(values))
    return positive + xp.log1p(_exp_minus_abs(values, xp=xp))


def log_sigmoid(values: Array, *, xp: Namespace) -> Array:
    r""":math:`\log\sigma(x) = \min(x, 0) - \log(1 + e^{-|x|})`, finite for every finite x."""
    negative = xp.where(values >= 0, xp.zeros_like(values), values)
    return negative - xp.log1p(_exp_minus_abs(values, xp=xp))


def sigmoid(values: Array, *, xp: Namespace) -> Array:
    r""":math:`\sigma(x) = 1 / (1 + e^{-x})`, the one stable form every moerouter module uses.

    With :math:`z = e^{-|x|} \in (0, 1]`: :math:`1 / (1 + z)` for :math:`x \ge 0` and
    :math:`z / (1 + z)` below. No ``exp`` overflows, so value and gradient are finite for every
    finite x (the naive ``1 / (1 + exp(-x))`` has a NaN gradient below about -88.7 in float32,
    where ``exp(-x)`` is ``inf``); :math:`\sigma(\pm\infty)` is 1 and 0 with slope 0.
    """
    z = _exp_minus_abs(values, xp=xp)
    # One division: ``where(x >= 0, 1, z) / (1 + z)`` is, entry by entry, the same correctly
    # rounded quotient as ``1 / (1 + z)`` or ``z / (1 + z)`` (the same bits), in fewer passes.
    return xp.where(values >= 0, xp.ones_like(z), z) / (1.0 + z)
