"""Sinkhorn routing: select from an entropic transport plan with balanced marginals (V-MoE).

Liu, Blondel, Riquelme, Puigcerver, "Routers in Vision Mixture of Experts: An Empirical Study"
(TMLR 2024, arXiv 2401.15969); reference code google-research/vmoe,
``vmoe/projects/sparsity_constrained_ot/kl_projection_routing.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moerouter._agnostic.scores import softmax
from moerouter._agnostic.transport import sinkhorn_potentials
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    CleanLogits,
    check_expert_layout_bounds,
    check_fields,
    check_positive_float,
    check_positive_int,
    check_token_layout_bounds,
    clean_logits,
)
from moerouter.policies._common import (
    check_capacity_options,
    check_capacity_policy_fields,
    expert_capacity,
)
from moerouter.policies._token_choice import (
    renormalized_scores,
    route_token_choice,
)
from moerouter.policies._transport import (
    expert_layout_routing,
    noisy_logits,
)
from moerouter.routing import Routing

__all__ = ["SinkhornExpertChoice", "SinkhornTokenChoice", "sinkhorn_plan"]


def _log_plan(clean: CleanLogits, epsilon: float, num_iters: int) -> tuple[Array, Array, Array]:
    """``(L + u + v, u, v)`` with ``L = logits / epsilon``; -inf on non-finite rows."""
    xp = clean.xp
    scaled = clean.values / epsilon
    u, v = sinkhorn_potentials(scaled, clean.finite_rows, num_iters=num_iters, xp=xp)
    return scaled + u + v, u, v


def sinkhorn_plan(logits: Array, *, epsilon: float = 1.0, num_iters: int = 20) -> Array:
    r"""The transport plan the Sinkhorn routers select from.

    .. math::

        \Pi = \operatorname*{arg\,min}_{\Pi \ge 0,\ \Pi 1 = 1_S,\ \Pi^\top 1 = (S/E) 1_E}
        \langle -\ell, \Pi \rangle - \varepsilon H(\Pi),

    approximated by ``num_iters`` log-domain Sinkhorn iterations from zero potentials (column
    update first, so every row of the returned plan sums to 1; column sums approach ``S / E``).
    Computed in float32 per group; non-finite rows get a zero row and do not count in ``S``.

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Router logits.
    epsilon : float
        Entropic regularisation :math:`\varepsilon > 0` (vmoe: 1).
    num_iters : int
        Sinkhorn iterations (vmoe: 20); fixed, so the function traces under ``jax.jit``.

    Returns
    -------
    array, float32, the shape of ``logits``

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> plan = mr.policies.sinkhorn_plan(xp.asarray([[3.0, 0.0], [3.0, 0.0]]), num_iters=50)
    >>> xp.round(plan * 100) / 100
    Array([[0.5, 0.5],
           [0.5, 0.5]], dtype=array_api_strict.float32)
    """
    check_positive_float(epsilon, "epsilon")
    check_positive_int(num_iters, "num_iters")
    if getattr(logits, "ndim", None) not in (2, 3):
        raise ValueError(
            "logits must have shape (tokens, experts) or (groups, tokens, experts), "
            f"got shape {tuple(getattr(logits, 'shape', ()))}"
        )
    clean = clean_logits(logits, int(logits.shape[-1]), columns_name="num_experts", strict=False)
    xp = clean.xp
    log_plan, _, _ = _log_plan(clean, epsilon, num_iters)
    plan = xp.where(clean.finite_rows[..., None], xp.exp(log_plan), xp.zeros_like(log_plan))
    return xp.reshape(plan, tuple(logits.shape))


def _check_common(policy: Any) -> None:
    check_positive_int(policy.num_experts, "num_experts")
    check_positive_float(policy.epsilon, "epsilon")
    check_positive_int(policy.num_iters, "num_iters")


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="optional")
@dataclass(frozen=True)
class SinkhornTokenChoice:
    r"""Sinkhorn token choice: each token takes the top-k experts of a balanced transport plan.

    Per group of :math:`S` tokens, :math:`\Pi` is the entropic optimal transport of the tokens
    (mass 1 each) onto the experts (mass :math:`S/E` each) for the cost :math:`-\ell`
    (:func:`sinkhorn_plan`, ``num_iters`` log-domain Sinkhorn iterations, regularisation
    :math:`\varepsilon`). Token :math:`t` picks :math:`\mathcal{K}_t = \mathrm{TopK}(\Pi_t, k)`
    and its combine weights are the router probabilities

    .. math::

        w_{t,e} = \mathrm{softmax}(\ell_t)_e \quad (e \in \mathcal{K}_t),

    renormalised over :math:`\mathcal{K}_t` with ``normalize=True``. The plan is a selection
    device only: gradients reach the logits through the softmax weights. This is the "Sinkhorn
    Token Choice" router of Liu et al., "Routers in Vision Mixture of Experts" (TMLR 2024), as in
    vmoe's ``KLProjectionNoisyTopExpertsPerItemRouter`` (ε = 1, 20 iterations, softmax combine
    weights, not renormalised).

    Noise. ``router(logits, noise)`` routes on ``logits + noise`` (vmoe adds
    :math:`\mathcal{N}(0, (1/E)^2)` noise in training; draw it yourself, e.g. with
    ``jax.random.normal``, so that equal inputs give equal decisions on every backend). With
    ``noisy_combine=True`` (default) the combine weights are the softmax of the same noisy
    logits, as in vmoe's Softmax and Sinkhorn *expert*-choice routers; ``noisy_combine=False``
    reproduces vmoe's Sinkhorn *token*-choice code, whose combine weights are the softmax of the
    clean logits (its ``gates_softmax_noisy = softmax(gates_logits)``, which looks like a slip).

    Selection compares plan entries of one token, computed as :math:`\ell_{t,e}/\varepsilon + v_e`
    (the token's own potential is a constant of the row): equal values go to the lower expert.
    The potentials are sums over tokens computed by each backend's own ``exp`` and ``sum``, so
    decisions are identical across backends for inputs without float32 near-ties. Capacity, if
    set, works as in :class:`~moerouter.TopK` (k-major priority, "position" or "probs").

    Parameters
    ----------
    %(num_experts_logits)s
    k : int
        Experts per token, ``1 <= k <= E``.
    epsilon : float
        Entropic regularisation :math:`\varepsilon > 0` of the plan (vmoe: 1.0).
    num_iters : int
        Sinkhorn iterations (vmoe: 20).
    normalize : bool
        Renormalise the k weights to sum to 1 (vmoe: False).
    noisy_combine : bool
        Combine weights from the noisy (True) or clean (False, vmoe token-choice quirk) logits.
    capacity_factor : float, optional
        Per-expert capacity ``ceil(cf * S * k / E)``; None routes every choice.
    capacity_multiple_of : int
        Round the capacity up to a multiple of this.
    drop_policy : {"position", "probs"}
        Who keeps their slot when an expert is full.
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.SinkhornTokenChoice(num_experts=2, k=1)
    >>> routing = router(xp.asarray([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]]))
    >>> routing.expert_ids  # plain top-1 would send every token to expert 0
    Array([0, 0, 1, 1], dtype=array_api_strict.int32)
    """

    num_experts: int
    k: int = 1
    epsilon: float = 1.0
    num_iters: int = 20
    normalize: bool = False
    noisy_combine: bool = True
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    drop_policy: str = "position"
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        _check_common(self)
        check_positive_int(self.k, "k")
        if self.k > self.num_experts:
            raise ValueError(f"k must be <= num_experts = {self.num_experts}, got {self.k}")
        check_capacity_options(self, ("position", "probs"))

    def __call__(self, logits: Array, noise: Array | None = None) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E), optionally perturbed by ``noise`` (same shape)."""
        check_token_layout_bounds(
            logits,
            self.k,
            num_experts=self.num_experts,
            with_capacity=self.capacity_factor is not None,
        )
        clean, noisy = noisy_logits(logits, noise, self.num_experts, strict=self.strict)
        xp = clean.xp
        scaled = noisy.values / self.epsilon
        _, v = sinkhorn_potentials(scaled, noisy.finite_rows, num_iters=self.num_iters, xp=xp)
        # The plan's row up to the token's own factor exp(u_t); a non-finite row scores all
        # zeros, so its raw choices are 0 .. k-1 as in TopK.
        row_score = xp.where(noisy.finite_rows[..., None], scaled + v, xp.zeros_like(scaled))
        choice = xp.argsort(-row_score, axis=-1, stable=True)[..., : self.k]
        combine_from = noisy if self.noisy_combine else clean
        probs = softmax(combine_from.values, xp=xp)
        chosen_logits = xp.take_along_axis(noisy.values, choice, axis=-1)
        routed = (chosen_logits > -xp.inf) & noisy.finite_rows[..., None]
        if self.normalize:
            chosen = xp.take_along_axis(combine_from.values, choice, axis=-1)
            weights = renormalized_scores(chosen, routed, score="softmax", xp=xp)
        else:
            weights = xp.take_along_axis(probs, choice, axis=-1)
        return route_token_choice(
            self, noisy, probs, choice, routed, weights, capacity_factor=self.capacity_factor
        )


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="always")
@dataclass(frozen=True)
class SinkhornExpertChoice:
    r"""Sinkhorn expert choice: each expert takes the top-C tokens of a balanced transport plan.

    Per group of :math:`S` tokens, :math:`\Pi` is the plan of :class:`SinkhornTokenChoice`
    (:func:`sinkhorn_plan`); expert :math:`e` takes the
    :math:`C = \min(S, \lceil \mathrm{cf} \cdot S / E \rceil)` tokens with the largest
    :math:`\Pi_{t,e}` and a taken token's combine weight is
    :math:`w_{t,e} = \mathrm{softmax}(\ell_t)_e`, as in vmoe's
    ``KLProjectionNoisyTopItemsPerExpertRouter`` (Liu et al., "Routers in Vision Mixture of
    Experts", TMLR 2024: "Sinkhorn Expert Choice"). Compared with :class:`~moerouter.ExpertChoice`,
    the plan's row normalisation stops one confident token from being taken by every expert.

    Selection compares plan entries of one expert column, computed as
    :math:`\ell_{t,e}/\varepsilon + u_t`; equal values go to the lower token index, and decisions
    are identical across backends for inputs without float32 near-ties. Pairs that cannot be
    routed (non-finite rows, -inf logits) rank last and, if taken, get expert -1 and weight 0.
    ``router(logits, noise)`` and ``noisy_combine`` work as in :class:`SinkhornTokenChoice`
    (vmoe's expert-choice code uses the noisy softmax: ``noisy_combine=True``). Not causal.

    Parameters
    ----------
    %(num_experts_logits)s
    capacity_factor : float
        ``cf > 0``, the mean number of experts per token.
    epsilon : float
        Entropic regularisation :math:`\varepsilon > 0` (vmoe: 1.0).
    num_iters : int
        Sinkhorn iterations (vmoe: 20).
    noisy_combine : bool
        Combine weights from the noisy (True) or clean (False) logits.
    %(capacity_multiple_of_capped)s
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.SinkhornExpertChoice(num_experts=2, capacity_factor=1.0)
    >>> routing = router(xp.asarray([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]]))
    >>> routing.token_ids  # expert 0 takes tokens 0, 1; expert 1 takes 3, 2
    Array([0, 1, 3, 2], dtype=array_api_strict.int32)
    """

    num_experts: int
    capacity_factor: float = 1.0
    epsilon: float = 1.0
    num_iters: int = 20
    noisy_combine: bool = True
    capacity_multiple_of: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        check_capacity_policy_fields(self)
        _check_common(self)

    def capacity(self, group_size: int) -> int:
        """Tokens each expert takes from a group of ``group_size`` tokens."""
        return expert_capacity(self, group_size)

    def __call__(self, logits: Array, noise: Array | None = None) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E), optionally perturbed by ``noise`` (same shape)."""
        check_expert_layout_bounds(logits, num_experts=self.num_experts, capacity=self.capacity)
        clean, noisy = noisy_logits(logits, noise, self.num_experts, strict=self.strict)
        xp = clean.xp
        scaled = noisy.values / self.epsilon
        u, _ = sinkhorn_potentials(scaled, noisy.finite_rows, num_iters=self.num_iters, xp=xp)
        column_score = scaled + u  # the plan's column up to the expert's own factor exp(v_e)
        combine_from = noisy if self.noisy_combine else clean
        return expert_layout_routing(
            noisy,
            column_score,
            softmax(combine_from.values, xp=xp),
            per_expert=self.capacity(noisy.group_size),
            num_experts=self.num_experts,
        )
