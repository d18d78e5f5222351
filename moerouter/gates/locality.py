"""LocMoE's gates (UNVERIFIED forms): grouped average pooling and LocMoE+'s token-expert affinity.

What produces router logits or scores from token features, for :class:`moerouter.LocalityTopK`
and :class:`moerouter.AffinityRouting` (:mod:`moerouter.policies.locality`, whose docstring says
how sure each form is). Both names stay importable from :mod:`moerouter.policies` and
:mod:`moerouter.policies.locality`.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import check_positive_int, is_array

__all__ = ["affinity_scores", "grouped_average_pooling"]


def grouped_average_pooling(x: Array, num_experts: int, *, xp: Any = None) -> Array:
    r"""LocMoE's parameter-free GrAP gate (UNVERIFIED): mean of each expert's block of features.

    :math:`h_e(x) = \frac{E}{d}\sum_{j = e d/E}^{(e+1) d/E - 1} x_j`, i.e. ``x @ W.T`` with
    orthogonal rows ``W[e, block e] = E / d``.

    Parameters
    ----------
    x : array (..., d)
        Token features; ``d`` a multiple of ``num_experts``.
    num_experts : int
        ``E``.
    xp : namespace, optional
        Inferred from ``x``.

    Returns
    -------
    array (..., E)
        Router logits.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.gates.grouped_average_pooling(xp.asarray([[1.0, 3.0, 5.0, 7.0]]), 2)
    Array([[2., 6.]], dtype=array_api_strict.float64)
    """
    if not is_array(x):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    xp = array_namespace(x) if xp is None else xp
    check_positive_int(num_experts, "num_experts")
    if x.ndim < 1 or x.shape[-1] % num_experts:
        raise ValueError(
            f"x's last dimension must be a multiple of num_experts = {num_experts}, "
            f"got shape {tuple(x.shape)}"
        )
    blocks = xp.reshape(x, (*x.shape[:-1], num_experts, x.shape[-1] // num_experts))
    return xp.mean(blocks, axis=-1)


@fill_doc
def affinity_scores(x: Array, gate_weight: Array, *, xp: Any = None) -> Array:
    r"""LocMoE+'s token-expert affinity (UNVERIFIED): :math:`\delta_{t,i} = \cos(x_t, w_i)`.

    Parameters
    ----------
    x : array (T, d)
        Token features.
    gate_weight : array (E, d)
        Router rows :math:`w_i`.
    %(xp)s

    Returns
    -------
    array (T, E) float32
        In ``[-1, 1]``; 0 where a token or a row is all zeros.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.gates.affinity_scores(xp.asarray([[3.0, 4.0]]), xp.asarray([[1.0, 0.0], [0.0, 2.0]]))
    Array([[0.6, 0.8]], dtype=array_api_strict.float32)
    """
    for value, name in ((x, "x"), (gate_weight, "gate_weight")):
        if not is_array(value) or value.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array")
    xp = array_namespace(x, gate_weight) if xp is None else xp
    if x.shape[1] != gate_weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} features but gate_weight {gate_weight.shape[1]} (second axis)"
        )
    tokens = xp.astype(x, xp.float32)
    rows = xp.astype(gate_weight, xp.float32)
    dots = xp.matmul(tokens, xp.permute_dims(rows, (1, 0)))
    token_norm = xp.sqrt(xp.sum(tokens * tokens, axis=1))[:, None]
    row_norm = xp.sqrt(xp.sum(rows * rows, axis=1))[None, :]
    norms = token_norm * row_norm
    return xp.clip(dots / xp.where(norms > 0, norms, xp.ones_like(norms)), -1.0, 1.0)
