r"""Losses of the adaptive-compute policies: top-p, ReLU routing and causal expert choice.

Each is a pure function of a :class:`~moerouter.Routing` (or of logits) returning a float32 scalar
of the routing's backend; rows with non-finite logits and masked rows (``mask``, shape (T,) or
(G, S), bool) contribute nothing and every mean counts valid tokens only, as in
:mod:`moerouter.losses`, which re-exports every name here.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from moerouter._agnostic.select import bincount
from moerouter.losses import _check_routing, _valid_tokens, entropy
from moerouter.routing import Routing

__all__ = ["dynamic_loss", "routed_load_balancing"]

Array = Any


def dynamic_loss(routing: Routing, *, mask: Array | None = None) -> Array:
    r"""The dynamic loss of top-p routing (Huang et al. 2024, arXiv:2403.07652, eq. 5).

    .. math::

        L_d = \frac{1}{T} \sum_t \Bigl( -\sum_e P_{t,e} \log P_{t,e} \Bigr),

    the mean entropy of each token's router distribution. Minimised (``+ beta * L_d``, the paper
    uses :math:`\beta = 10^{-4}` [UNVERIFIED: the authors' released code holds inference only])
    it sharpens the router, so that :class:`~moerouter.TopP` reaches ``p`` with fewer experts
    instead of spreading probability to buy more of them. The same number as
    :func:`moerouter.losses.entropy`, under the paper's name.

    Parameters
    ----------
    routing : Routing
        Any policy's output (usually :class:`~moerouter.TopP`'s).
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.

    Returns
    -------
    array ()
        float32 scalar; 0 with no valid token.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopP(num_experts=2, p=0.5, max_k=2)(xp.zeros((3, 2)))
    >>> round(float(mr.losses.dynamic_loss(routing)), 4)  # log 2
    0.6931
    """
    return entropy(routing, mask=mask)


def _routed_per_expert(routing: Routing, valid: Array, xp: Any) -> Array:
    """(E,) float32: assignments of valid tokens that reach each real expert (after drops)."""
    counted = xp.take(valid, routing.token_ids) & (routing.expert_ids >= 0)
    ids = xp.where(counted, routing.expert_ids, xp.asarray(-1, dtype=xp.int32))
    return xp.astype(bincount(ids, routing.num_experts, xp=xp), xp.float32)


def routed_load_balancing(routing: Routing, *, mask: Array | None = None) -> Array:
    r"""Switch balancing loss over the experts a token actually reaches.

    .. math::

        L = E \sum_e f_e P_e, \qquad
        f_e = \frac{c_e}{\sum_j c_j}, \qquad P_e = \frac{1}{T} \sum_t p_{t,e},

    with :math:`c_e` the assignments of valid tokens routed to real expert :math:`e` (after
    top-p's cut, ReLU's zeros and capacity drops) and :math:`p` the routing's ``probs`` (for
    :class:`~moerouter.ReLURouting`, the ReLU gates). 1.0 at uniform routing, as
    :func:`moerouter.losses.load_balancing`, whose counts are each token's top-``k`` scores or
    raw choices: for a policy with a variable number of experts per token, the unused slots
    would count there. Huang et al. 2024 pair top-p routing with this loss (:math:`\alpha = 10^{-2}`
    [UNVERIFIED: not in the authors' released code]).

    Parameters
    ----------
    routing : Routing
        Any policy's output.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.

    Returns
    -------
    array ()
        float32 scalar, differentiable through ``probs``; 0 when nothing is routed.
    """
    routing = _check_routing(routing)
    xp = array_namespace(routing.probs)
    valid = _valid_tokens(routing, mask, xp)
    counts = _routed_per_expert(routing, valid, xp)
    total = xp.sum(counts)
    share = counts / xp.where(total > 0, total, xp.ones_like(total))
    real = routing.probs[:, : routing.num_experts]
    probs = xp.where(valid[:, None], real, xp.zeros_like(real))
    tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
    return routing.num_experts * xp.sum(share * xp.sum(probs, axis=0)) / tokens
