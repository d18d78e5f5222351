"""Routing with a selection-only expert bias, for any backend: the MoE layers' shared path.

:class:`~moerouter.DeepSeekTopK` takes the bias itself; :class:`~moerouter.TopK` gets it here
(selection on ``logits + bias``, weights and probabilities from the unbiased logits). The JAX
layer's ``route`` and the torch ``MoE`` both call :func:`route_with_expert_bias`, so they route
alike.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from array_api_compat import array_namespace

from moerouter._typing import Array
from moerouter.policies._router import chosen_weights
from moerouter.policies.deepseek import DeepSeekTopK
from moerouter.policies.topk import TopK
from moerouter.routing import Routing

__all__ = ["route_with_expert_bias"]


def route_with_expert_bias(router: Any, logits: Array, expert_bias: Array) -> Routing:
    """``router(logits)`` with ``expert_bias`` (E,) added to the real experts' logits for
    selection only (the caller stops its gradient).

    Raises
    ------
    TypeError
        ``router`` is neither a :class:`~moerouter.DeepSeekTopK` nor a :class:`~moerouter.TopK`.
    ValueError
        ``expert_bias`` is not of shape ``(E,)``.
    """
    if isinstance(router, DeepSeekTopK):  # the core's own selection-only bias
        return router(logits, expert_bias)
    if not isinstance(router, TopK):
        raise TypeError(
            "expert_bias needs a moerouter.DeepSeekTopK or moerouter.TopK router, got "
            f"{type(router).__name__}"
        )
    num_experts = router.num_experts
    if tuple(expert_bias.shape) != (num_experts,):
        raise ValueError(
            f"expert_bias must have shape ({num_experts},), got {tuple(expert_bias.shape)}"
        )
    xp = array_namespace(logits, expert_bias)
    logits32 = xp.astype(logits, xp.float32)
    biased = router(logits32 + xp.astype(expert_bias, xp.float32))
    uncapped = {field.name: getattr(router, field.name) for field in fields(router)}
    unbiased = type(router)(**{**uncapped, "capacity_factor": None})(logits32)
    choice = xp.reshape(biased.choice_ids, (-1, router.k))
    # take_along_axis wants the namespace's index dtype (torch: int64; JAX without x64: int32).
    index = xp.astype(choice, xp.__array_namespace_info__().default_dtypes()["indexing"])
    values = xp.reshape(logits32, (unbiased.probs.shape[0], num_experts))
    chosen = xp.take_along_axis(values, index, axis=-1)
    routed = (chosen > -xp.inf) & biased.finite_rows[:, None]
    # TopK's own weight rule at the biased choice (renormalised sigmoid scores in log space).
    weights = chosen_weights(
        chosen,
        routed,
        unbiased.probs,
        index,
        score=router.score,
        weights=router._weight_rule,
        xp=xp,
    )
    kept = xp.reshape(biased.expert_ids, choice.shape) >= 0
    weights = xp.where(kept, weights, xp.zeros_like(weights))
    return Routing(
        token_ids=biased.token_ids,
        expert_ids=biased.expert_ids,
        weights=xp.astype(xp.reshape(weights, (-1,)), xp.float32),
        choice_ids=biased.choice_ids,
        probs=unbiased.probs,
        finite_rows=biased.finite_rows,
        num_tokens=biased.num_tokens,
        num_experts=biased.num_experts,
        layout=biased.layout,
        slots=biased.slots,
        num_groups=biased.num_groups,
    )
