"""What the expert-layout and transport-based policies share: noisy logits, the expert layout."""

from __future__ import annotations

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._agnostic.expert_choice import select_per_expert
from moerouter._agnostic.scores import to_float32
from moerouter._typing import Array
from moerouter._validation import CleanLogits, clean_logits
from moerouter.routing import Routing


def noisy_logits(
    logits: Array, noise: Array | None, num_columns: int, *, strict: bool
) -> tuple[CleanLogits, CleanLogits]:
    """The cleaned logits with and without ``noise`` added (the same object when it is None).

    A row is routable only where both are finite; the returned pair share that mask.
    """
    clean = clean_logits(logits, num_columns, columns_name="num_experts", strict=strict)
    if noise is None:
        return clean, clean
    if not bool(is_array_api_obj(noise)):  # bool(): keep noise's type un-narrowed for mypy
        raise TypeError(f"noise must be an array or None, got {type(noise).__name__}")
    try:
        array_namespace(logits, noise)
    except TypeError as error:
        raise TypeError("noise and logits must be arrays of the same backend") from error
    if tuple(noise.shape) != tuple(logits.shape):
        raise ValueError(
            f"noise must have the shape of logits {tuple(logits.shape)}, got {tuple(noise.shape)}"
        )
    xp = clean.xp
    if not xp.isdtype(noise.dtype, "real floating"):
        raise TypeError(f"noise must be a real floating dtype, got {noise.dtype}")
    raw = to_float32(logits, xp=xp) + xp.astype(noise, xp.float32)
    noisy = clean_logits(raw, num_columns, columns_name="num_experts", strict=strict)
    finite = noisy.finite_rows & clean.finite_rows
    mask = finite[..., None]

    def restrict(c: CleanLogits) -> CleanLogits:
        values = xp.where(mask, c.values, xp.zeros_like(c.values))
        return CleanLogits(values, finite, c.num_groups, c.group_size, xp)

    return restrict(clean), restrict(noisy)


def expert_layout_routing(
    clean: CleanLogits, ranking: Array, probs: Array, *, per_expert: int, num_experts: int
) -> Routing:
    """Every expert takes the ``per_expert`` tokens with the largest ``ranking`` in its column.

    ``ranking`` and ``probs`` are (G, S, E); the selection is
    :func:`moerouter._agnostic.expert_choice.select_per_expert`: ties go to the lower token index,
    and a pair that cannot be routed (a non-finite row, or a -inf logit) is never given an expert
    (it only fills slots left over, as expert -1 with weight 0). The combine weight of a taken
    pair is its ``probs`` entry. Returns an "expert" layout Routing (R = G * E * C).
    """
    xp = clean.xp
    finite = clean.finite_rows[..., None]
    probs = xp.where(finite, probs, xp.zeros_like(probs))
    routable = finite & (clean.values > -xp.inf)
    token_ids, expert_ids, weights, choice_ids = select_per_expert(
        ranking, probs, routable, per_expert=per_expert, xp=xp, device=clean.device
    )
    num_tokens = clean.num_groups * clean.group_size
    return Routing(
        token_ids=token_ids,
        expert_ids=expert_ids,
        weights=weights,
        choice_ids=choice_ids,
        probs=xp.reshape(probs, (num_tokens, num_experts)),
        finite_rows=xp.reshape(clean.finite_rows, (-1,)),
        num_tokens=num_tokens,
        num_experts=num_experts,
        layout="expert",
        slots=per_expert,
        num_groups=clean.num_groups,
    )
