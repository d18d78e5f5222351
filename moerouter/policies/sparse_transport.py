"""Sparsity-constrained expert choice: k-sparse optimal transport (Liu, Puigcerver, Blondel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moerouter._agnostic.scores import softmax
from moerouter._agnostic.transport import sparse_transport_plan
from moerouter._arrays import device_of
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_expert_layout_bounds,
    check_positive_float,
    check_positive_int,
    clean_logits,
)
from moerouter.policies._common import check_capacity_policy_fields, expert_capacity
from moerouter.policies._transport import expert_layout_routing
from moerouter.routing import Routing

__all__ = ["SparsityConstrainedExpertChoice"]


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="always")
@dataclass(frozen=True)
class SparsityConstrainedExpertChoice:
    r"""Expert choice from a sparsity-constrained optimal transport plan.

    Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023
    (arXiv 2209.15466); router #5 of Liu et al., "Routers in Vision Mixture of Experts"
    (TMLR 2024), as in vmoe's ``KSparseProjectionTransportTopItemsPerExpertRouter``. Per group of
    :math:`S` tokens, with :math:`P = \mathrm{softmax}(\ell)` and capacity
    :math:`C = \min(S, \lceil \mathrm{cf} \cdot S / E \rceil)`, the plan is

    .. math::

        \Pi = \operatorname*{arg\,min}_{\Pi 1 = 1_S,\ \Pi^\top 1 = (S/E) 1_E,\
        \|\Pi_{:,e}\|_0 \le C} \langle -P, \Pi \rangle
        + \sum_e \frac{\gamma\, b_e}{2} \Bigl\| \frac{\Pi_{:,e}}{b_e} \Bigr\|^2,
        \qquad b_e = S / E,

    solved in the semi-dual over the token potential :math:`\alpha` with ``num_steps`` Adam steps
    of rate ``learning_rate`` from :math:`\alpha = 0` (vmoe: γ = 1, 20 steps, rate 0.01); each
    column is :math:`b_e` times the projection of :math:`(\alpha + P_{:,e}) / (\gamma b_e)` onto
    the simplex restricted to ``C`` non-zeros (JAXopt's ``projection_sparse_simplex``). Expert
    :math:`e` then takes the ``C`` tokens with the largest :math:`\Pi_{t,e}` (ties, including the
    exact zeros outside the support, to the lower token index) with combine weight
    :math:`P_{t,e}`. Like vmoe, a fixed small number of steps approximates the plan: row sums
    are not exactly 1 after 20 steps, and the support may hold fewer than ``C`` tokens, in which
    case the expert fills its remaining slots with zero-plan tokens in index order.

    Decisions compare float32 plan entries across tokens after an iterative solve, so they are
    identical across backends for inputs without float32 near-ties. Pairs that cannot be routed
    (non-finite rows, -inf logits) rank last and, if taken, get expert -1 and weight 0. Not
    causal.

    Parameters
    ----------
    %(num_experts_logits)s
    capacity_factor : float
        ``cf > 0``; ``C`` is both the sparsity bound of a column and the tokens an expert takes.
    gamma : float
        Strength :math:`\gamma > 0` of the squared-ℓ2 regulariser.
    num_steps : int
        Adam steps on the semi-dual.
    learning_rate : float
        Adam's step size.
    %(capacity_multiple_of_capped)s
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.SparsityConstrainedExpertChoice(num_experts=2, capacity_factor=1.0)
    >>> routing = router(xp.asarray([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.5, 0.0]]))
    >>> routing.token_ids
    Array([0, 1, 2, 3], dtype=array_api_strict.int32)
    """

    num_experts: int
    capacity_factor: float = 1.0
    gamma: float = 1.0
    num_steps: int = 20
    learning_rate: float = 0.01
    capacity_multiple_of: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        check_capacity_policy_fields(self)
        check_positive_float(self.gamma, "gamma")
        check_positive_int(self.num_steps, "num_steps", minimum=0)
        check_positive_float(self.learning_rate, "learning_rate")

    def capacity(self, group_size: int) -> int:
        """Tokens each expert takes from a group of ``group_size`` tokens."""
        return expert_capacity(self, group_size)

    def plan(self, logits: Array) -> Array:
        """The sparse transport plan, (T, E) or (G, S, E) float32; zero on non-finite rows."""
        clean = clean_logits(
            logits, self.num_experts, columns_name="num_experts", strict=self.strict
        )
        plan = self._plan(clean.values, clean.finite_rows, clean.xp)
        return clean.xp.reshape(plan, tuple(logits.shape))

    def _plan(self, values: Array, finite_rows: Array, xp: Any) -> Array:
        probs = xp.where(finite_rows[..., None], softmax(values, xp=xp), xp.zeros_like(values))
        plan = sparse_transport_plan(
            probs,
            self.capacity(int(values.shape[1])),
            gamma=self.gamma,
            num_steps=self.num_steps,
            learning_rate=self.learning_rate,
            xp=xp,
            device=device_of(values),
        )
        return xp.where(finite_rows[..., None], plan, xp.zeros_like(plan))

    def __call__(self, logits: Array) -> Routing:
        """Route ``logits`` of shape (T, E) or (G, S, E); see the class docstring."""
        check_expert_layout_bounds(logits, num_experts=self.num_experts, capacity=self.capacity)
        clean = clean_logits(
            logits, self.num_experts, columns_name="num_experts", strict=self.strict
        )
        xp = clean.xp
        probs = softmax(clean.values, xp=xp)
        return expert_layout_routing(
            clean,
            self._plan(clean.values, clean.finite_rows, xp),
            probs,
            per_expert=self.capacity(clean.group_size),
            num_experts=self.num_experts,
        )
