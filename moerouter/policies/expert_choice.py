"""Expert choice: every expert picks its top-C tokens (Zhou et al., NeurIPS 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from moerouter._agnostic.scores import softmax
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_capacity_factor,
    check_expert_layout_bounds,
    clean_logits,
)
from moerouter.policies._common import check_capacity_policy_fields, expert_capacity
from moerouter.policies._transport import expert_layout_routing
from moerouter.routing import Routing

__all__ = ["ExpertChoice"]


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="always")
@dataclass(frozen=True)
class ExpertChoice:
    r"""Expert choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", 2022).

    Per group of :math:`S` tokens, :math:`P = \mathrm{softmax}(\ell)` over experts for each token;
    each expert :math:`e` takes the :math:`C = \lceil \mathrm{cf} \cdot S / E \rceil` tokens with
    the largest :math:`P_{t,e}` (``C`` is capped at ``S``), and a chosen token's output is
    :math:`y_t = \sum_{e : t \in \mathcal{C}_e} P_{t,e} \, f_e(x_t)`. A token may be taken by any
    number of experts, zero included; every expert is exactly full, so no balancing loss is needed.

    Equal computed probabilities go to the lower token index. Probabilities of different tokens are
    normalised with each backend's own ``exp`` and ``sum``, so two tokens whose true probabilities
    are equal may round differently per backend: decisions are identical across backends for
    inputs without such float32 near-ties. Expert choice looks at the whole group, so it is not
    causal: do not use it in an autoregressive decoder.

    The routing has the "expert" layout: ``R = G * E * C`` assignments, reshaping to (G, E, C),
    slot ``c`` of expert ``e`` holding its ``c``-th best token. A token is never routed to an expert
    whose logit is -inf, nor anywhere when its row is non-finite: such pairs rank last and, when an
    expert has fewer than ``C`` other tokens, fill its remaining slots as expert -1 with weight 0.

    ``capacity_factor`` can be changed per call (``router(logits, capacity_factor=1.0)``), as in
    :class:`TopK`, e.g. a lower capacity at inference; the constructor's value is the default.
    ``C`` sets the routing's static shape, so under ``jax.jit`` pass it as a static argument.

    Parameters
    ----------
    %(num_experts_logits)s
    capacity_factor : float
        ``cf`` > 0, the mean number of experts per token (the paper's main setting is 2).
    %(capacity_multiple_of_capped)s
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.ExpertChoice(num_experts=2, capacity_factor=1.0)
    >>> routing = router(xp.asarray([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0]]))
    >>> routing.token_ids
    Array([0, 1, 2, 3], dtype=array_api_strict.int32)
    """

    num_experts: int
    capacity_factor: float = 2.0
    capacity_multiple_of: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        check_capacity_policy_fields(self)

    def capacity(self, group_size: int, capacity_factor: float | None = None) -> int:
        """Tokens each expert takes from a group of ``group_size`` tokens.

        ``capacity_factor``, when given, replaces the constructor's value.
        """
        if capacity_factor is not None:
            check_capacity_factor(capacity_factor)
        return expert_capacity(self, group_size, capacity_factor)

    def __call__(self, logits: Array, *, capacity_factor: float | None = None) -> Routing:
        """Route ``logits`` of shape (T, E) or (G, S, E); see the class docstring.

        ``capacity_factor``, when given, replaces the constructor's value for this call.
        """
        check_expert_layout_bounds(
            logits,
            num_experts=self.num_experts,
            capacity=lambda group_size: self.capacity(group_size, capacity_factor),
        )
        clean = clean_logits(
            logits, self.num_experts, columns_name="num_experts", strict=self.strict
        )
        xp = clean.xp
        per_expert = self.capacity(clean.group_size, capacity_factor)
        probs = softmax(clean.values, xp=xp)
        return expert_layout_routing(
            clean, probs, probs, per_expert=per_expert, num_experts=self.num_experts
        )
