"""Top-p (dynamic) routing: a token takes experts until their probability reaches p (Huang 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from moerouter._arrays import device_of
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._validation import check_fields
from moerouter.policies._common import (
    check_capacity_options,
    check_positive_int,
)
from moerouter.policies._token_choice import (
    DROP_POLICIES,
    choose,
    clean_token_choice_logits,
    renormalized_scores,
    route_token_choice,
    softmax,
)
from moerouter.routing import Routing

__all__ = ["TopP", "top_p_keep"]

Array = Any


def check_p(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"p must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"p must be a number in [0, 1], got {value}")
    return float(value)


def check_max_k(value: object, num_experts: int) -> int:
    max_k = check_positive_int(value, "max_k")
    if max_k > num_experts:
        raise ValueError(f"max_k must be <= num_experts = {num_experts}, got {max_k}")
    return max_k


def top_p_keep(chosen_probs: Array, p: float, *, xp: Any) -> Array:
    """Which of a token's slots (best first, last axis) top-p keeps: the first always, then each
    slot whose better slots hold probability mass below ``p``.

    ``p = 1`` keeps every slot: mathematically every finite logit has a positive probability, so
    the mass before any slot is below 1, but a float32 sum may round to 1.0 early; comparing it
    would make ``p = 1`` depend on each backend's rounding.
    """
    if p >= 1.0:
        return xp.ones(chosen_probs.shape, dtype=xp.bool, device=device_of(chosen_probs))
    # Mass of the strictly better slots: an exclusive cumulative sum, not ``inclusive - own``,
    # which rounds differently and could flip a slot sitting exactly at ``p``.
    before = xp.cumulative_sum(chosen_probs, axis=-1, include_initial=True)[..., :-1]
    first = xp.arange(chosen_probs.shape[-1], device=device_of(chosen_probs)) == 0
    return first | (before < p)


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="optional", causal=True)
@dataclass(frozen=True)
class TopP:
    r"""Top-p (dynamic) routing (Huang et al., "Harder Tasks Need More Experts: Dynamic Routing
    in MoE Models", ACL 2024, arXiv:2403.07652).

    With :math:`P = \mathrm{softmax}(\ell)` and the experts sorted by descending :math:`P`
    (:math:`I_1, I_2, \dots`), a token takes the fewest experts whose probability reaches ``p``,
    at most ``max_k``:

    .. math::

        t = \min\Bigl(\operatorname*{argmin}_{k \geq 1} \Bigl\{ \sum_{j \leq k} P_{I_j}
            \geq p \Bigr\},\ k_{\max}\Bigr), \qquad
        y = \sum_{j \leq t} P_{I_j} \, f_{I_j}(x).

    The weights are the raw probabilities, as in the paper and the authors' inference code
    (``normalize=True`` renormalises them over the chosen experts instead). Slot ``j`` is kept
    when ``j = 0`` or the mass of the ``j`` better slots is ``< p``; so ``p = 0`` is top-1 and
    ``p = 1`` takes ``max_k`` experts (every finite one). The authors' code keeps a slot when that
    mass is ``<= p`` (it stops once the sum *exceeds* ``p``); the two differ only when the sum
    equals ``p`` exactly.

    Static shapes: ``max_k`` slots per token in descending order (ties to the lower expert
    index, exact on every backend); unused slots get expert -1 and weight 0, and count as a
    "dropped" choice in :func:`moerouter.stats.summary` (read ``real_experts_per_token``).
    Whether a slot is used compares float32 sums of probabilities, which each backend computes
    with its own ``exp``: decisions agree across backends for inputs where no partial sum lies
    within float32 rounding of ``p``.

    Capacity (``capacity_factor`` set) is as in :class:`TopK` with ``k = max_k``:
    :math:`C = \lceil \mathrm{cf} \cdot S \cdot k_{\max} / E \rceil`; only used slots take rows.

    Parameters
    ----------
    %(num_experts_logits)s
    p : float
        Probability threshold in ``[0, 1]`` (the paper uses 0.4).
    max_k : int
        Most experts per token, ``1 <= max_k <= E``: the routing's static slots.
    normalize : bool
        Renormalise the weights over the chosen experts (not in the paper).
    capacity_factor, capacity_multiple_of, drop_policy, strict
        As in :class:`TopK`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.TopP(num_experts=4, p=0.5, max_k=3)
    >>> routing = router(xp.log(xp.asarray([[0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]])))
    >>> routing.expert_ids
    Array([ 0, -1, -1,  0,  1, -1], dtype=array_api_strict.int32)
    """

    num_experts: int
    p: float
    max_k: int
    normalize: bool = False
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    drop_policy: Literal["position", "probs", "batch_priority"] = "position"
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_p(self.p)
        check_max_k(self.max_k, self.num_experts)
        check_capacity_options(self, DROP_POLICIES)

    def __call__(self, logits: Array, *, p: float | None = None) -> Routing:
        """Route ``logits`` of shape (T, E) or (G, S, E); see the class docstring.

        ``p``, when given, replaces the constructor's value for this call.
        """
        p = self.p if p is None else check_p(p)
        clean = clean_token_choice_logits(self, logits, self.max_k, self.capacity_factor)
        xp = clean.xp
        probs = softmax(clean.values, xp=xp)
        choice, chosen_logits = choose(clean, self.max_k)
        keep = top_p_keep(xp.take_along_axis(probs, choice, axis=-1), p, xp=xp)
        routed = keep & (chosen_logits > -xp.inf) & clean.finite_rows[..., None]
        if self.normalize:
            weights = renormalized_scores(chosen_logits, routed, score="softmax", xp=xp)
        else:
            weights = xp.take_along_axis(probs, choice, axis=-1)
        return route_token_choice(
            self, clean, probs, choice, routed, weights, capacity_factor=self.capacity_factor
        )
