"""AdaMoE: null experts let each token use an adaptive number of real experts (Zeng et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moerouter._capabilities import PolicyCapabilities
from moerouter._typing import Array
from moerouter._validation import (
    check_fields,
    check_k,
    check_positive_int,
)
from moerouter.policies._common import check_capacity_options
from moerouter.policies._router import policy_router
from moerouter.policies._token_choice import (
    DROP_POLICIES,
    call_capacity_factor,
    route_token_choice,
)
from moerouter.routing import Routing

__all__ = ["NullExperts"]


@PolicyCapabilities(scores=("softmax",), capacity="optional", causal=True)
@dataclass(frozen=True)
class NullExperts:
    r"""AdaMoE token-adaptive routing with null experts (Zeng et al., Findings of EMNLP 2024).

    The router has :math:`E` real and :math:`m` null expert columns. With
    :math:`p = \mathrm{softmax}(\ell)` over all :math:`E + m` columns, each token takes its
    top-:math:`k'` columns over all of them; null choices cost nothing and output nothing, and the
    real choices :math:`\mathcal{R}` are weighted

    .. math::

        w_j = \frac{p_j}{\sum_{i \in \mathcal{R}} p_i}
            = \mathrm{softmax}(\ell_{\mathcal{R}})_j, \qquad j \in \mathcal{R},

    so a token that picked only null experts gets zero output, and the null logits receive no
    gradient from the task output (the partition function cancels): only a balancing loss such as
    :func:`moerouter.losses.null_load_balancing` trains them. This matches the official code
    (``CengZihao/AdaMoE``, ``CustomMixtralSparseMoeBlock`` and ``Linear_MoE.forward``). With
    ``num_null = 0`` and the same ``k`` it equals :class:`TopK` with ``normalize=True``.

    Null choices appear in ``Routing.choice_ids`` as columns ``>= num_experts`` and as
    ``expert_ids == -1``. Capacity, when set, applies to real experts only, as in :class:`TopK`.

    Parameters
    ----------
    num_experts : int
        Real experts ``E``.
    num_null : int
        Null experts ``m >= 0`` (the AdaMoE Mixtral run used 16 with E = 8).
    k : int
        Choices per token over all columns, ``1 <= k <= E + m`` (4 in that run).
    capacity_factor, capacity_multiple_of, min_capacity, drop_policy, strict
        As in :class:`TopK`; ``k`` and ``capacity_factor`` can also be given per call.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.NullExperts(num_experts=2, num_null=2, k=2)
    >>> routing = router(xp.asarray([[5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 3.0, 3.0]]))
    >>> routing.expert_ids
    Array([ 0, -1, -1, -1], dtype=array_api_strict.int32)
    >>> routing.weights
    Array([1., 0., 0., 0.], dtype=array_api_strict.float32)
    """

    num_experts: int
    num_null: int
    k: int
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    drop_policy: Literal["position", "probs", "batch_priority"] = "position"
    strict: bool = False
    min_capacity: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_positive_int(self.num_null, "num_null", minimum=0)
        check_k(self.k, self.num_experts + self.num_null, "num_experts + num_null")
        check_capacity_options(self, DROP_POLICIES)

    def __call__(
        self, logits: Array, *, k: int | None = None, capacity_factor: float | None = None
    ) -> Routing:
        """Route ``logits`` of shape (T, E + m) or (G, S, E + m); see the class docstring.

        ``k`` and ``capacity_factor``, when given, replace the constructor's values for this call.
        """
        k = (
            self.k
            if k is None
            else check_k(k, self.num_experts + self.num_null, "num_experts + num_null")
        )
        capacity_factor = call_capacity_factor(self, capacity_factor)
        # The real choices' weights are the softmax of their logits (AdaMoE's renormalisation).
        decision = policy_router(
            self,
            logits,
            k,
            capacity_factor,
            num_columns=self.num_experts + self.num_null,
            columns_name="num_experts + num_null",
            weights="renormalize",
            num_real=self.num_experts,
        )
        return route_token_choice(
            self,
            decision,
            decision.probs,
            decision.choice,
            decision.routed,
            decision.weights,
            capacity_factor=capacity_factor,
            probs_masked=True,
            all_routed=decision.all_routed,
        )
