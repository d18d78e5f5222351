r"""Losses of the adaptive-compute policies: top-p, ReLU routing and causal expert choice.

Each is a pure function of a :class:`~moerouter.Routing` (or of logits) returning a float32 scalar
of the routing's backend; rows with non-finite logits and masked rows (``mask``, shape (T,) or
(G, S), bool) contribute nothing and every mean counts valid tokens only, as in
:mod:`moerouter.losses`, which re-exports every name here.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from moerouter._agnostic.scores import softplus
from moerouter._agnostic.select import bincount
from moerouter._arrays import device_of
from moerouter._docs import fill_doc
from moerouter._validation import check_floating, check_positive_int, check_routing, valid_tokens
from moerouter.losses.regularisers import entropy
from moerouter.policies.causal_expert_choice import expert_choice_targets
from moerouter.routing import Routing

__all__ = [
    "causal_predictor_loss",
    "dynamic_loss",
    "relu_cut_fraction",
    "relu_l1_loss",
    "relu_sparsity",
    "routed_load_balancing",
]

Array = Any


@fill_doc
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
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar :math:`L_d`, the mean router entropy; 0 with no valid token.

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
    where = device_of(routing.expert_ids)
    ids = xp.where(counted, routing.expert_ids, xp.asarray(-1, dtype=xp.int32, device=where))
    return xp.astype(bincount(ids, routing.num_experts, xp=xp, device=where), xp.float32)


@fill_doc
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
    %(routing)s
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar, differentiable through ``probs``; 0 when nothing is routed.
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    counts = _routed_per_expert(routing, valid, xp)
    total = xp.sum(counts)
    share = counts / xp.where(total > 0, total, xp.ones_like(total))
    real = routing.probs[:, : routing.num_experts]
    probs = xp.where(valid[:, None], real, xp.zeros_like(real))
    tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
    return routing.num_experts * xp.sum(share * xp.sum(probs, axis=0)) / tokens


def _valid_gates(routing: Routing, mask: Array | None) -> tuple[Array, Array, Any]:
    """(T, E) gates of valid tokens (zero elsewhere), (T,) valid, namespace."""
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    gates = routing.probs[:, : routing.num_experts]
    return xp.where(valid[:, None], gates, xp.zeros_like(gates)), valid, xp


@fill_doc
def relu_l1_loss(
    routing: Routing, *, target_k: int | None = None, mask: Array | None = None
) -> Array:
    r"""ReMoE's L1 penalty on the ReLU gates (Wang et al., ICLR 2025, arXiv:2412.14711).

    Plain (``target_k=None``, the paper's eq. 6) and load-balanced (``target_k=k``, eq. 8):

    .. math::

        L_{\text{reg}} = \frac{1}{T} \sum_t \sum_e R_{t,e}, \qquad
        L_{\text{reg,lb}} = \frac{1}{T} \sum_t \sum_e f_e R_{t,e}, \quad
        f_e = \frac{E}{k T} \sum_t \mathbb{1}[R_{t,e} > 0],

    over valid tokens, with :math:`R` the gates (``Routing.probs`` of
    :class:`~moerouter.ReLURouting`) and :math:`f_e` a constant (an indicator count). The
    balanced form is what the authors' code uses (``ReLURouter.apply_l1_reg``, through
    Megatron's ``switch_load_balancing_loss_func`` with their ``topk``), so it pushes the gates of
    busy experts harder. Counts are of positive gates, before ``max_k`` cuts or capacity drops.
    Multiply by the coefficient of :func:`moerouter.policies.update_l1_coefficient`'s state; the
    code adds it per layer (the paper averages over layers, a factor the adaptive coefficient
    absorbs).

    Parameters
    ----------
    routing : Routing
        :class:`~moerouter.ReLURouting`'s output.
    target_k : int, optional
        ``k`` of the target sparsity ``1 - k/E``; turns load balancing on.
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar :math:`L_{\text{reg}}` (or :math:`L_{\text{reg,lb}}`); 0 with no valid token.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.ReLURouting(num_experts=2, max_k=2)(xp.asarray([[1.0, -1.0], [3.0, 0.5]]))
    >>> float(mr.losses.relu_l1_loss(routing))  # (1 + 3.5) / 2
    2.25
    """
    gates, valid, xp = _valid_gates(routing, mask)
    tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
    if target_k is None:
        return xp.sum(gates) / tokens
    k = check_positive_int(target_k, "target_k")
    if k > routing.num_experts:
        raise ValueError(f"target_k must be <= num_experts = {routing.num_experts}, got {k}")
    active = xp.sum(xp.astype(gates > 0, xp.float32), axis=0)
    share = routing.num_experts * active / (k * tokens)
    return xp.sum(share * xp.sum(gates, axis=0)) / tokens


@fill_doc
def relu_sparsity(routing: Routing, *, mask: Array | None = None) -> Array:
    r"""Share of zero gates over valid tokens, :math:`S = 1 - \frac{1}{TE}\sum_{t,e}
    \mathbb{1}[R_{t,e} > 0]` (ReMoE's :math:`S_i`; 0.0 with no valid token, as every loss and stat).

    The input of :func:`moerouter.policies.update_l1_coefficient`; counted before ``max_k``
    cuts and capacity drops, as in the authors' code. ``E (1 - S)`` is the mean number of
    positive gates per token.

    Parameters
    ----------
    routing : Routing
        :class:`~moerouter.ReLURouting`'s output.
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar, not differentiable (a count).
    """
    gates, valid, xp = _valid_gates(routing, mask)
    cells = xp.sum(xp.astype(valid, xp.float32)) * routing.num_experts
    zero = xp.sum(xp.astype((gates <= 0) & valid[:, None], xp.float32))
    # The share of zero gates among valid cells: 0.0 with no valid token, as every loss and stat.
    return zero / xp.clip(cells, min=1.0)


@fill_doc
def relu_cut_fraction(routing: Routing, *, mask: Array | None = None) -> Array:
    """Share of positive gates of valid tokens that got no slot because of the ``max_k`` cap.

    0 when ``max_k = num_experts``; capacity drops are not cuts (see
    :func:`moerouter.stats.summary`'s ``dropped_fraction``).

    Parameters
    ----------
    routing : Routing
        :class:`~moerouter.ReLURouting`'s output (token layout).
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar; 0 when no gate is positive.
    """
    gates, _, xp = _valid_gates(routing, mask)
    positive = xp.sum(xp.astype(gates > 0, xp.float32))
    cells = routing.token_ids * routing.num_experts + routing.choice_ids
    in_slot = xp.take(xp.reshape(gates, (-1,)), cells) > 0
    slotted = xp.sum(xp.astype(in_slot, xp.float32))
    return (positive - slotted) / xp.clip(positive, min=1.0)


@fill_doc
def causal_predictor_loss(
    predictor_logits: Array, routing: Routing, *, mask: Array | None = None
) -> Array:
    r"""Binary cross-entropy of a causal expert-choice predictor (Mixture-of-Depths §3.5).

    .. math::

        L = \frac{1}{T E} \sum_{t, e} \Bigl( \mathrm{softplus}(z_{t,e}) - z_{t,e}\, y_{t,e}
            \Bigr),

    the mean over valid tokens and experts of the cross-entropy between the predictor's logits
    :math:`z` and the batch expert-choice membership :math:`y_{t,e} \in \{0, 1\}`
    (:func:`moerouter.policies.expert_choice_targets`), in the form that stays finite for every
    finite :math:`z`. The predictor should see a stop-gradient copy of the router's input, so
    that this loss trains the predictor only; at inference
    :class:`~moerouter.CausalExpertChoice` (``mode="predictor"``) routes where :math:`z > 0`.

    Parameters
    ----------
    predictor_logits : array (T, E) or (G, S, E)
        The predictor's outputs for the routing's tokens, real floating.
    routing : Routing
        ``router(logits, training=True)`` of a :class:`~moerouter.CausalExpertChoice`.
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar; 0 with no valid token.
    """
    routing = check_routing(routing)
    targets = expert_choice_targets(routing)
    xp = array_namespace(predictor_logits, targets)
    if predictor_logits.ndim not in (2, 3) or predictor_logits.shape[-1] != routing.num_experts:
        raise ValueError(
            f"predictor_logits must have shape (T, {routing.num_experts}) or "
            f"(G, S, {routing.num_experts}), got {tuple(predictor_logits.shape)}"
        )
    check_floating(predictor_logits, "predictor_logits")
    z = xp.reshape(xp.astype(predictor_logits, xp.float32), (-1, routing.num_experts))
    if int(z.shape[0]) != routing.num_tokens:
        raise ValueError(
            f"predictor_logits hold {z.shape[0]} tokens, the routing {routing.num_tokens}"
        )
    valid = valid_tokens(routing, mask, xp)
    per_cell = softplus(z, xp=xp) - z * targets
    per_cell = xp.where(valid[:, None], per_cell, xp.zeros_like(per_cell))
    cells = xp.clip(xp.sum(xp.astype(valid, xp.float32)) * routing.num_experts, min=1.0)
    return xp.sum(per_cell) / cells
