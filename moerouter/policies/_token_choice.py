"""The shared half of every token-choice policy: top-k choice, weights, capacity.

``softmax``, ``masked_softmax`` and ``renormalize`` (now in :mod:`moerouter._agnostic.scores`)
stay importable from here for code written against the earlier layout.
"""

from __future__ import annotations

from typing import Any, Protocol

from moerouter._agnostic.scores import log_sigmoid, masked_softmax, renormalize, softmax
from moerouter._agnostic.select import descending_rank, select_top_k
from moerouter._arrays import device_of
from moerouter._typing import Array
from moerouter._validation import (
    CleanLogits,
    check_capacity_factor,
    check_token_layout_bounds,
    clean_logits,
)
from moerouter.policies._common import capacity, drop_over_capacity
from moerouter.routing import Routing

__all__ = [
    "DROP_POLICIES",
    "call_capacity_factor",
    "choose",
    "clean_token_choice_logits",
    "masked_softmax",
    "renormalize",
    "renormalized_scores",
    "route_token_choice",
    "softmax",
    "token_choice_routing",
]

DROP_POLICIES = ("position", "probs", "batch_priority")


class RowState(Protocol):
    """What :func:`token_choice_routing` reads of the routed rows: a ``CleanLogits`` or a
    router's ``RouterResult``."""

    @property
    def xp(self) -> Any: ...

    @property
    def finite_rows(self) -> Array: ...

    @property
    def device(self) -> Any: ...


def choose(clean: CleanLogits, k: int) -> tuple[Array, Array]:
    """Top-k columns of each row and their logits.

    The columns keep the backend's index dtype (torch gathers only with int64); they become int32
    when the Routing is built.
    """
    xp = clean.xp
    choice = select_top_k(clean.values, k, xp=xp, nan_free=True)
    return choice, xp.take_along_axis(clean.values, choice, axis=-1)


def renormalized_scores(
    chosen_logits: Array, routed: Array | None, *, score: str, xp: Any
) -> Array:
    """Scores of the chosen columns renormalised to sum 1 over the routed ones.

    ``softmax(l)_j / sum softmax(l)_i`` and ``sigmoid(l)_j / sum sigmoid(l)_i`` over the chosen
    columns are both a softmax of log-scores over them (``l`` or ``log sigmoid(l)``). Dividing
    the scores by their sum instead breaks down when every chosen score is tiny (every sigmoid
    logit below about -44, or a group-limited or biased choice far below the row's best): the
    sum's squared inverse overflows float32 and the gradient is NaN on JAX; the log-space form
    is finite for every finite logit.
    """
    log_scores = chosen_logits if score == "softmax" else log_sigmoid(chosen_logits, xp=xp)
    # routed=None: every choice is routed (masked_softmax skips its mask).
    return masked_softmax(log_scores, routed, xp=xp, device=device_of(chosen_logits))


def token_choice_routing(
    clean: RowState,
    probs: Array,
    choice: Array,
    routed: Array,
    weights: Array,
    *,
    num_experts: int,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
    min_capacity: int = 0,
    capacity_rounding: str = "exact",
    probs_masked: bool = False,
    all_routed: bool = False,
) -> Routing:
    """Apply capacity and flatten a token-choice decision into a token-layout Routing.

    ``choice``, ``routed`` and ``weights`` are (G, S, k): chosen columns, whether each choice goes
    to a real expert, and its combine weight. Priority inside one choice rank is token order
    ("position"), the probability of that choice ("probs"), or the probability of the token's
    first choice, the same for all its k choices ("batch_priority", V-MoE's BPR).
    ``probs_masked``: ``probs`` are already zero on non-finite rows (a router's result), so the
    pass that zeroes them is skipped. ``all_routed``: the caller checked that ``routed`` is all
    True (a router's result), so the passes that mask with it are skipped.
    """
    xp, device = clean.xp, clean.device
    num_groups, group_size, k = choice.shape
    choice_ids = xp.astype(choice, xp.int32)
    expert_ids = (
        xp.asarray(choice_ids, copy=True)  # not a view of choice_ids: a caller may edit one
        if all_routed
        else xp.where(routed, choice_ids, xp.asarray(-1, dtype=xp.int32, device=device))
    )
    if not probs_masked:
        probs = xp.where(clean.finite_rows[..., None], probs, xp.zeros_like(probs))
    per_expert = None
    if capacity_factor is not None:
        per_expert = capacity(
            capacity_factor,
            group_size,
            k,
            num_experts,
            capacity_multiple_of,
            min_capacity,
            capacity_rounding,
        )
        slot = xp.arange(k, dtype=xp.int32, device=device)[None, None, :]
        if drop_policy == "position":
            within_rank = xp.arange(group_size, dtype=xp.int32, device=device)[None, :, None]
        else:
            chosen_probs = xp.take_along_axis(probs, choice, axis=-1)
            if drop_policy == "batch_priority":
                chosen_probs = chosen_probs[..., :1]  # the first choice ranks all k choices
            within_rank = xp.astype(descending_rank(chosen_probs, axis=1, xp=xp), xp.int32)
        priority = xp.broadcast_to(slot * group_size + within_rank, choice.shape)  # k-major
        # Explicit sizes, not -1: a reshape cannot infer a dimension of an empty array.
        expert_ids = xp.reshape(
            drop_over_capacity(
                xp.reshape(expert_ids, (num_groups, group_size * k)),
                xp.reshape(priority, (num_groups, group_size * k)),
                num_experts=num_experts,
                capacity=per_expert,
                xp=xp,
                device=device,
            ),
            choice.shape,
        )
    if per_expert is not None or not all_routed:
        weights = xp.where(expert_ids >= 0, weights, xp.zeros_like(weights))
    num_tokens = num_groups * group_size
    tokens = xp.arange(num_tokens, dtype=xp.int32, device=device)
    return Routing(
        token_ids=xp.reshape(xp.broadcast_to(tokens[:, None], (num_tokens, k)), (-1,)),
        expert_ids=xp.reshape(expert_ids, (-1,)),
        weights=xp.reshape(weights, (-1,)),
        choice_ids=xp.reshape(choice_ids, (-1,)),
        probs=xp.reshape(probs, (num_tokens, probs.shape[-1])),
        finite_rows=xp.reshape(clean.finite_rows, (-1,)),
        num_tokens=num_tokens,
        num_experts=num_experts,
        layout="token",
        slots=k,
        num_groups=num_groups,
        capacity=per_expert,
    )


def call_capacity_factor(policy: Any, capacity_factor: float | None) -> float | None:
    """The capacity factor of one call: the policy's own, or the call's override (checked)."""
    if capacity_factor is None:
        return policy.capacity_factor  # type: ignore[no-any-return]
    check_capacity_factor(capacity_factor)
    return capacity_factor


def clean_token_choice_logits(
    policy: Any,
    logits: Array,
    k: int,
    capacity_factor: float | None,
    *,
    num_columns: int | None = None,
    columns_name: str = "num_experts",
) -> CleanLogits:
    """The opening every token-choice policy shares: refuse shapes whose int32 indices would
    wrap (before anything is built), then :func:`~moerouter._validation.clean_logits` with the
    policy's ``strict``. ``num_columns`` defaults to the policy's ``num_experts``."""
    check_token_layout_bounds(
        logits, k, num_experts=policy.num_experts, with_capacity=capacity_factor is not None
    )
    columns = policy.num_experts if num_columns is None else num_columns
    return clean_logits(logits, columns, columns_name=columns_name, strict=policy.strict)


def route_token_choice(
    policy: Any,
    clean: RowState,
    probs: Array,
    choice: Array,
    routed: Array,
    weights: Array,
    *,
    capacity_factor: float | None,
    probs_masked: bool = False,
    all_routed: bool = False,
) -> Routing:
    """:func:`token_choice_routing` with the capacity options of ``policy``: its
    ``num_experts``, ``capacity_multiple_of`` and ``drop_policy``, and its ``min_capacity`` and
    ``capacity_rounding`` where it has them (else 0 and "exact")."""
    return token_choice_routing(
        clean,
        probs,
        choice,
        routed,
        weights,
        num_experts=policy.num_experts,
        capacity_factor=capacity_factor,
        capacity_multiple_of=policy.capacity_multiple_of,
        drop_policy=policy.drop_policy,
        min_capacity=getattr(policy, "min_capacity", 0),
        capacity_rounding=getattr(policy, "capacity_rounding", "exact"),
        probs_masked=probs_masked,
        all_routed=all_routed,
    )
