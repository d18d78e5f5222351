"""Token choice: every token picks its k best experts (Shazeer 2017, GShard, Switch, Mixtral)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
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

__all__ = ["TopK"]


@fill_doc
@PolicyCapabilities(scores=("softmax", "sigmoid"), capacity="optional", causal=True)
@dataclass(frozen=True)
class TopK:
    r"""Softmax or sigmoid top-k token choice, with optional capacity.

    For a token with logits :math:`\ell \in \mathbb{R}^E`, scores are
    :math:`p = \mathrm{softmax}(\ell)` (or :math:`\sigma(\ell)`), the token picks
    :math:`\mathcal{K} = \mathrm{TopK}(\ell, k)` and its weights are

    .. math::

        w_j = \frac{p_j}{\sum_{i \in \mathcal{K}} p_i} \quad (\texttt{normalize=True}),
        \qquad w_j = p_j \quad (\texttt{normalize=False}),
        \qquad w_j = \mathrm{softmax}(\ell_{\mathcal{K}})_j \quad (\texttt{softmax\_after\_topk}).

    For softmax scores the renormalised weights and ``softmax_after_topk`` are the same numbers
    (the partition function cancels); both are computed as a softmax over the k selected logits.
    Mixtral and Qwen (``norm_topk_prob``) renormalise; Switch (k=1) and GShard use raw
    probabilities (``normalize=False``: with k=1 a renormalised weight is always 1 and the router
    gets no gradient from the task loss).

    Selection ranks the logits, which are monotone with the scores inside a row, so ties are exact
    on every backend: equal logits go to the lower expert index, and the k slots of a token are in
    descending order. A ``-inf`` logit is never routed to (its slot gets expert -1, weight 0).

    Capacity (``capacity_factor`` set): each group of S tokens gives every expert
    :math:`C = \max(\lceil \mathrm{cf} \cdot S \cdot k / E \rceil, C_{\min})` rows, rounded up
    to ``capacity_multiple_of``. Priority is k-major: every token's first choice is served before
    any second choice; within one choice rank, tokens go in order ("position"), by descending
    probability of that choice ("probs", ties by position), as in GShard, V-MoE and Megatron-Core,
    or by descending probability of the token's *first* choice for all its k choices
    ("batch_priority": V-MoE's batch prioritized routing, Riquelme et al. 2021, so that
    low-confidence tokens are dropped first). Dropped choices become expert -1 with weight 0; the
    remaining weights are not renormalised.

    ``k`` and ``capacity_factor`` can be changed per call (``router(logits, k=1,
    capacity_factor=0.5)``), as Tutel allows, e.g. a lower capacity at inference; the constructor's
    values are the defaults. Under ``jax.jit`` pass them as static arguments. To switch capacity
    off for one call, call ``dataclasses.replace(router, capacity_factor=None)``.

    Parameters
    ----------
    %(num_experts_logits)s
    k : int
        Experts per token, ``1 <= k <= E``.
    score : {"softmax", "sigmoid"}
        Score function (``"sigmoid"``: DeepSeek-V3).
    normalize : bool
        Renormalise the k weights to sum to 1.
    softmax_after_topk : bool
        Weights are the softmax of the k selected logits, whatever ``score`` is.
    capacity_factor : float, optional
        Turns capacity on; must be > 0.
    capacity_multiple_of : int
        Round the capacity up to a multiple of this (vmoe uses 4).
    min_capacity : int
        Lower bound on the capacity before rounding (Megatron-Core's ``min_capacity``,
        flaxformer's ``min_expert_capacity``); 0 for none.
    drop_policy : {"position", "probs", "batch_priority"}
        Who keeps their slot when an expert is full.
    strict : bool
        Raise on non-finite logits rows instead of routing them nowhere (concrete values only).
    capacity_rounding : {"exact", "megatron"}
        ``"exact"``: the ceiling of the exact :math:`\mathrm{cf} \cdot S k / E`. ``"megatron"``:
        the ceiling of Megatron-Core's float64 ``(S * k / E) * cf`` (``get_capacity``), which
        float noise can push one row higher (``S=50, E=3, k=1, cf=0.9``: 16, not 15); for
        matching Megatron-Core's buffers bit for bit.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=4, k=2)(xp.asarray([[1.0, 3.0, 3.0, 0.0]]))
    >>> routing.expert_ids
    Array([1, 2], dtype=array_api_strict.int32)
    >>> routing.weights
    Array([0.5, 0.5], dtype=array_api_strict.float32)
    """

    num_experts: int
    k: int
    score: Literal["softmax", "sigmoid"] = "softmax"
    normalize: bool = True
    softmax_after_topk: bool = False
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    drop_policy: Literal["position", "probs", "batch_priority"] = "position"
    strict: bool = False
    min_capacity: int = 0
    capacity_rounding: Literal["exact", "megatron"] = "exact"

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_k(self.k, self.num_experts)
        check_choice(self.score, "score", ("softmax", "sigmoid"))
        check_capacity_options(self, DROP_POLICIES)

    @property
    def _weight_rule(self) -> str:
        """The router slot's weight rule for these options (``_router.WEIGHT_RULES``)."""
        if self.softmax_after_topk:
            return "softmax_after_topk"
        return "renormalize" if self.normalize else "raw"

    def __call__(
        self, logits: Array, *, k: int | None = None, capacity_factor: float | None = None
    ) -> Routing:
        """Route ``logits`` of shape (T, E) or (G, S, E); see the class docstring.

        ``k`` and ``capacity_factor``, when given, replace the constructor's values for this call.
        """
        k = self.k if k is None else check_k(k, self.num_experts)
        capacity_factor = call_capacity_factor(self, capacity_factor)
        decision = policy_router(
            self, logits, k, capacity_factor, score=self.score, weights=self._weight_rule
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
