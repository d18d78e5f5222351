"""What every balancing loss shares: conventions, counted choices, normalised scores."""

from __future__ import annotations

from typing import Any, Literal

from moerouter._agnostic.select import bincount, top_k
from moerouter._arrays import check_index_bound, device_of, on_cpu
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    concrete_all,
)
from moerouter.routing import Routing

__all__ = [
    "Convention",
    "Count",
    "_choice_counts",
    "_counted_choices",
    "_cv_squared",
    "_normalised_scores",
]


Convention = Literal["megatron", "mixtral", "gshard"]
_CONVENTIONS = ("megatron", "mixtral", "gshard")
Count = Literal["top_k", "choices"]
_COUNTS = ("top_k", "choices")
# t2t's cv_squared adds this to the squared mean so that an all-zero vector gives 0, not NaN.
_CV_EPSILON = 1e-10
# Per-token score sums are floored here before normalising (see _normalised_scores).
_MIN_SCORE_SUM = 1e-15


def _normalised_scores(probs: Array, valid: Array, xp: Any) -> Array:
    """``p / max(sum_j p, 1e-15)`` per token, zero on invalid tokens.

    The floor only touches sigmoid scores whose sum is below 1e-15 (every logit below about
    -37): their true slope ``1 / sum`` is not representable in float32, and JAX's quotient
    rule squares the denominator (``0 / y`` has a NaN gradient for y below about 5e-20).
    """
    total = xp.sum(probs, axis=-1, keepdims=True)
    scores = probs / xp.where(total > _MIN_SCORE_SUM, total, xp.full_like(total, _MIN_SCORE_SUM))
    return xp.where(valid[:, None], scores, xp.zeros_like(scores))


def _cv_squared(values: Array, xp: Any) -> Array:
    """Squared coefficient of variation, population variance: ``var / (mean**2 + 1e-10)``."""
    mean = xp.mean(values)
    variance = xp.mean((values - mean) ** 2)
    return variance / (mean**2 + _CV_EPSILON)


def _counted_choices(
    routing: Routing, count: str, xp: Any, valid: Array | None = None
) -> tuple[Array, Array]:
    """(token_ids, column_ids) of the (token, column) pairs :math:`c_e` counts.

    ``"top_k"``: each token's ``k`` best columns by router score, as Megatron-Core and
    transformers count, whatever the policy chose; ``"choices"``: the routing's raw choices.
    An expert-layout routing has no per-token ``k``: its choices count.

    Equal scores go to the routing's own choices first, then to the lower column. Any order of
    equal scores is a top-k; this one makes the count exactly the routing's choices for every
    policy that chose the top-k of its scores, even where scores underflow to equal values on
    one backend and not on another (XLA flushes denormals to zero).

    With ``valid`` given, only the pairs of valid tokens have to be right (the others are not
    counted), which lets a routing whose choices already are that top-k skip the sorts.
    """
    check_choice(count, "count", _COUNTS)
    if count == "choices" or routing.layout != "token":
        return routing.token_ids, routing.choice_ids
    if _choices_are_top_k(routing, valid, xp):
        # The same pairs, found in O(T k) (order aside, which no count sees).
        return routing.token_ids, routing.choice_ids
    k, num_columns = routing.slots, routing.num_choices
    device = device_of(routing.probs)
    # A token layout reshapes to (T, k); one comparison per slot: O(T E') memory, no T * E' index.
    slots = xp.reshape(routing.choice_ids, (routing.num_tokens, k))
    every_column = xp.arange(num_columns, dtype=slots.dtype, device=device)
    chosen = xp.zeros((routing.num_tokens, num_columns), dtype=xp.bool, device=device)
    for slot in range(k):
        chosen = chosen | (slots[:, slot : slot + 1] == every_column)
    # Two stable sorts: the routing's choices first, then by descending score.
    chosen_first = xp.argsort(xp.astype(~chosen, xp.int8), axis=-1, stable=True)
    scores = xp.take_along_axis(routing.probs, chosen_first, axis=-1)
    best = xp.take_along_axis(chosen_first, top_k(scores, k, xp=xp), axis=-1)
    columns = xp.astype(best, xp.int32)
    tokens = xp.arange(routing.num_tokens, dtype=xp.int32, device=device)
    tokens = xp.broadcast_to(tokens[:, None], (routing.num_tokens, k))
    return xp.reshape(tokens, (-1,)), xp.reshape(columns, (-1,))


def _choices_are_top_k(routing: Routing, valid: Array | None, xp: Any) -> bool:
    """True when every valid token's ``k`` choices are ``k`` distinct columns holding its ``k``
    largest scores (ties with unchosen columns allowed): then they are exactly the pairs the
    ``"top_k"`` count ranks, chosen columns winning ties. TopK, NullExperts and every policy that
    picks the top-k of its scores pass; biased, group-limited or random choices fail.

    Read on the host, so only where that is free: concrete CPU arrays (False while traced or on
    an accelerator, where the sorts run instead; the count is the same either way).
    """
    if valid is None or not on_cpu(routing.probs):
        return False
    if routing.num_tokens * routing.num_choices >= 2**31 or routing.num_tokens == 0:
        return False  # flat int32 indices would overflow; nothing to count anyway
    k, num_columns = routing.slots, routing.num_choices
    slots = xp.reshape(routing.choice_ids, (routing.num_tokens, k))
    in_range = xp.all((slots >= 0) & (slots < num_columns), axis=-1)
    safe = xp.where(in_range[:, None], slots, xp.zeros_like(slots))
    if k * k <= 4 * num_columns:  # (T, k, k) equalities: no sort, O(T E') work
        equal = safe[:, :, None] == safe[:, None, :]
        distinct = xp.count_nonzero(equal, axis=(1, 2)) == k
    else:  # an unstable sort: the stable one is slow on torch CPU (see select.bincount)
        ordered = xp.sort(safe, axis=-1, stable=False)
        distinct = xp.all(ordered[:, 1:] != ordered[:, :-1], axis=-1)
    row_start = xp.arange(routing.num_tokens, dtype=slots.dtype, device=device_of(slots))
    flat = xp.reshape(row_start[:, None] * num_columns + safe, (-1,))
    chosen = xp.reshape(xp.take(xp.reshape(routing.probs, (-1,)), flat), (routing.num_tokens, k))
    lowest = xp.min(chosen, axis=-1, keepdims=True)
    # No unchosen column above the lowest chosen score: as many columns above it as choices.
    above = xp.count_nonzero(routing.probs > lowest, axis=-1)
    chosen_above = xp.count_nonzero(chosen > lowest, axis=-1)
    top = in_range & distinct & (above == chosen_above) & ~xp.isnan(lowest[:, 0])
    return concrete_all(top | ~valid, xp=xp) is True


def _choice_counts(
    routing: Routing, valid: Array, num_groups: int, xp: Any, count: str = "top_k"
) -> Array:
    """(G, E') float32 counted choices of valid tokens per group (G = 1 pools every group)."""
    num_columns = routing.num_choices
    check_index_bound("choice buckets", G=num_groups, **{"E'": num_columns})
    device = device_of(routing.choice_ids)
    # At least 1: with zero tokens there is no token id to divide.
    tokens_per_group = max(routing.num_tokens // max(num_groups, 1), 1)
    token_ids, column_ids = _counted_choices(routing, count, xp, valid)
    chose = xp.take(valid, token_ids)
    group = token_ids // tokens_per_group
    # Choices of invalid tokens are not choices: give them an out-of-range id.
    no_choice = xp.asarray(-1, dtype=xp.int32, device=device)
    bucket = xp.where(chose, group * num_columns + column_ids, no_choice)
    counts = bincount(bucket, num_groups * num_columns, xp=xp, device=device)
    counts = xp.astype(counts, xp.float32)
    return xp.reshape(counts, (num_groups, num_columns))
