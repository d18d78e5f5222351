"""BASE layers' balanced assignment: every expert gets exactly S/E tokens (Lewis et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass

from moerouter._agnostic.scores import sigmoid, softmax
from moerouter._agnostic.transport import balanced_rounds, sinkhorn_potentials
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_fields,
    check_positive_float,
    check_positive_int,
    check_token_layout_bounds,
    clean_logits,
)
from moerouter.policies._token_choice import token_choice_routing
from moerouter.routing import Routing

__all__ = ["BalancedAssignment"]


@fill_doc
@PolicyCapabilities(scores=("sigmoid",), capacity="exact")
@dataclass(frozen=True)
class BalancedAssignment:
    r"""BASE-layer routing: a balanced one-expert-per-token assignment of high total affinity.

    Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer, "BASE Layers: Simplifying Training of Large,
    Sparse Models", ICML 2021 (arXiv 2103.16716). For a group of :math:`S` tokens with affinities
    :math:`\ell_{s,e}` (BASE: :math:`x_s \cdot w_e` against expert centroids), BASE solves

    .. math::

        \max_{a : [S] \to [E]} \sum_s \ell_{s, a(s)} \quad \text{s.t.} \quad
        |\{s : a(s) = e\}| = S / E \ \ \forall e,

    a linear assignment, with a C++ auction algorithm (fairseq ``libbase.balanced_assignment``).
    An exact solver has data-dependent control flow, so moerouter solves it approximately, with
    static shapes and fixed work:

    1. ``num_iters`` log-domain Sinkhorn iterations give the entropic plan
       :math:`\Pi \propto \exp(\ell / \varepsilon)` with row sums 1 and column sums :math:`S/E`
       (:func:`~moerouter.policies.sinkhorn_plan`; small :math:`\varepsilon` approaches the
       exact transport, which for these marginals is the assignment itself);
    2. ``E`` rounds of proposals round it: every unassigned token proposes to its best expert (by
       :math:`\Pi`) that still has room, and each expert keeps its best proposals (by
       :math:`\Pi`) up to its room. A round that leaves a token unassigned fills some expert, so
       after ``E`` rounds every token is placed and **every expert holds exactly** :math:`S/E`
       tokens.

    The result is exactly balanced but not always optimal. Measured against
    ``scipy.optimize.linear_sum_assignment`` on :math:`\mathcal{N}(0, 1)` affinities with the
    defaults (ε = 0.05, 100 iterations; 20 random groups each): total affinity within 0.65 %
    of the optimum on average for S = 16, E = 4 (optimal in 85 % of groups), 0.95 % for
    S = 64, E = 8, 0.48 % for S = 256, E = 16 (worst group 2.6 %). ε is in logit units: scale it
    with the spread of your affinities.

    The combine weight is BASE's gate :math:`\sigma(\ell_{s,a(s)})`; BASE's layer output is
    :math:`y_s = \sigma(\ell_{s,a(s)}) f_{a(s)}(x_s) + (1 - \sigma(\ell_{s,a(s)})) x_s`, so add
    ``(1 - weight) * x`` yourself. BASE routes greedily at evaluation time: use
    ``TopK(num_experts=E, k=1, score="sigmoid", normalize=False)``, whose weight is the same
    :math:`\sigma(\ell)`. ``probs`` holds the softmax of the logits, for losses and stats.

    Non-finite rows take no place (their experts end up short). A token placed on an expert whose
    logit is -inf (only when every other expert is full) gets expert -1 and weight 0. Decisions
    compare plan entries across tokens, so they are identical across backends for inputs without
    float32 near-ties. Token layout, ``k = 1``.

    Parameters
    ----------
    num_experts : int
        ``E``; the group size ``S`` must be a multiple of it.
    epsilon : float
        Entropic regularisation of the Sinkhorn plan, in logit units.
    num_iters : int
        Sinkhorn iterations.
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.BalancedAssignment(num_experts=2)
    >>> routing = router(xp.asarray([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.5, 0.0]]))
    >>> routing.expert_ids  # top-1 would give expert 0 all four tokens
    Array([0, 1, 1, 0], dtype=array_api_strict.int32)
    """

    num_experts: int
    epsilon: float = 0.05
    num_iters: int = 100
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_positive_float(self.epsilon, "epsilon")
        check_positive_int(self.num_iters, "num_iters")

    def __call__(self, logits: Array) -> Routing:
        """Route ``logits`` of shape (T, E) or (G, S, E), ``S`` a multiple of ``E``."""
        # One expert per token; balanced_rounds buckets proposals by (group, expert).
        check_token_layout_bounds(logits, 1, num_experts=self.num_experts, with_capacity=True)
        clean = clean_logits(
            logits, self.num_experts, columns_name="num_experts", strict=self.strict
        )
        xp, device = clean.xp, clean.device
        if clean.group_size % self.num_experts != 0:
            raise ValueError(
                f"logits have groups of {clean.group_size} tokens, which is not a multiple of "
                f"num_experts = {self.num_experts}: an exactly balanced assignment needs one"
            )
        scaled = clean.values / self.epsilon
        u, v = sinkhorn_potentials(scaled, clean.finite_rows, num_iters=self.num_iters, xp=xp)
        assigned = balanced_rounds(
            scaled + u + v,
            clean.finite_rows,
            per_expert=clean.group_size // self.num_experts,
            num_rounds=self.num_experts,
            xp=xp,
            device=device,
        )[..., None]  # (G, S, 1)
        placed = assigned >= 0
        choice = xp.where(placed, assigned, xp.zeros_like(assigned))
        # A mask, not a gather: torch gathers with int64 indices only.
        is_choice = choice == xp.arange(self.num_experts, dtype=xp.int32, device=device)
        chosen_logits = xp.sum(
            xp.where(is_choice, clean.values, xp.zeros_like(clean.values)), axis=-1, keepdims=True
        )
        routed = placed & (chosen_logits > -xp.inf) & clean.finite_rows[..., None]
        weights = xp.where(routed, sigmoid(chosen_logits, xp=xp), xp.zeros_like(chosen_logits))
        return token_choice_routing(
            clean,
            softmax(clean.values, xp=xp),
            choice,
            routed,
            weights,
            num_experts=self.num_experts,
        )
