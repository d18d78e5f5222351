"""Router regularisers: the :func:`entropy` of the scores and ST-MoE's :func:`z_loss`."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from moerouter._arrays import on_cpu
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_routing,
    concrete_all,
    flat_mask,
    valid_tokens,
)
from moerouter.losses._shared import (
    _normalised_scores,
)
from moerouter.routing import Routing

__all__ = ["entropy", "z_loss"]


@fill_doc
def entropy(routing: Routing, *, mask: Array | None = None) -> Array:
    r"""Mean entropy (nats) of the router's per-token distribution.

    .. math::

        H = \frac{1}{T} \sum_t \Bigl( -\sum_e \hat p_{t,e} \log \hat p_{t,e} \Bigr),

    over valid tokens, with :math:`\hat p` the scores normalised per token (softmax probabilities
    as they are) and :math:`0 \log 0 = 0`. Between 0 (every token certain) and :math:`\log E'`
    (uniform). :func:`moerouter.stats.summary`'s ``router_entropy`` is the same number (except
    for tokens whose sigmoid scores sum below :math:`10^{-15}`, which the loss normalises by
    that floor to keep its gradient finite).

    **Sign convention:** this returns :math:`H \geq 0`. Adding ``+ coefficient * H`` to a loss
    that is minimised sharpens each token's routing (confident, specialised choices, as entropy
    penalties on gates do); adding ``- coefficient * H`` spreads it (exploration). It is a
    per-token quantity: it says nothing about balance across tokens, which the balancing losses
    measure.

    Parameters
    ----------
    %(routing)s
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar, differentiable with respect to the router probabilities (an entry that
        is exactly 0 gets gradient 0).
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.zeros((3, 2)))
    >>> round(float(mr.losses.entropy(routing)), 4)  # log 2
    0.6931
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    scores = _normalised_scores(routing.probs, valid, xp)
    positive = scores > 0
    safe = xp.where(positive, scores, xp.ones_like(scores))
    plogp = xp.where(positive, scores * xp.log(safe), xp.zeros_like(scores))
    tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
    return -xp.sum(plogp) / tokens


@fill_doc
def z_loss(logits: Array, *, mask: Array | None = None, xp: Any = None) -> Array:
    r"""Router z-loss (Zoph et al., ST-MoE, 2022).

    :math:`L_z = \frac{1}{T}\sum_t (\log\sum_j e^{\ell_{t,j}})^2` over valid tokens.

    Penalises large router logits to keep the softmax numerically tame. Computed in float32;
    rows holding NaN or +inf, or only -inf, are left out of the mean (as every policy routes them
    nowhere), and so are masked rows. Megatron-Core's ``z_loss_func`` (padding-mask aware),
    Flaxformer's ``_router_z_loss`` (sum over groups and tokens divided by their number) and
    transformers' Switch ``router_z_loss_func`` use the same normalisation.

    Parameters
    ----------
    logits : array (T, E') or (G, S, E')
        Router logits, any real floating dtype.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens: ``logits.shape[:-1]`` or flattened to (G·S,).
    xp : namespace, optional
        Array namespace; inferred from ``logits`` when None.

    Returns
    -------
    %(masked_scalar)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> float(mr.losses.z_loss(xp.asarray([[0.0, 0.0]])))  # (log 2)^2
    0.480453...
    """
    xp = array_namespace(logits) if xp is None else xp
    if logits.ndim not in (2, 3):
        raise ValueError(
            "logits must have shape (tokens, experts) or (groups, tokens, experts), "
            f"got shape {tuple(logits.shape)}"
        )
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits must be a real floating dtype, got {logits.dtype}")
    values = xp.reshape(xp.astype(logits, xp.float32, copy=False), (-1, logits.shape[-1]))
    shapes = (tuple(logits.shape[:-1]), (int(values.shape[0]),))
    flat = flat_mask(mask, shapes, xp)
    # finite_rows in one pass: the maximum is finite iff the row holds no NaN (maxima propagate
    # NaN), no +inf, and an entry above -inf.
    row_max = xp.max(values, axis=-1, keepdims=True)
    finite = xp.isfinite(row_max[:, 0])
    finite = finite if flat is None else finite & flat
    if not (on_cpu(values) and concrete_all(finite, xp=xp)):
        # Rows left out read zeros: no inf or NaN reaches the sum, or the gradient.
        # (The maximum is taken again: the raw one's gradient is NaN on a NaN row.)
        values = xp.where(finite[:, None], values, xp.zeros_like(values))
        row_max = xp.max(values, axis=-1, keepdims=True)
    logsumexp = xp.log(xp.sum(xp.exp(values - row_max), axis=-1)) + row_max[:, 0]
    squares = xp.where(finite, logsumexp**2, xp.zeros_like(logsumexp))
    count = xp.clip(xp.sum(xp.astype(finite, xp.float32)), min=1.0)
    return xp.sum(squares) / count
