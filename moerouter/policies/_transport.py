"""What the transport-based policies share: argument checks, noisy logits, the expert layout."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from moerouter.policies._common import CleanLogits, clean_logits
from moerouter.routing import Routing

Array = Any


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
    raw = xp.astype(logits, xp.float32) + xp.astype(noise, xp.float32)
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

    ``ranking`` and ``probs`` are (G, S, E); ties go to the lower token index. Pairs that cannot be
    routed (a non-finite row, or a -inf logit) rank last and, if still taken, get expert -1 and
    weight 0. The combine weight of a taken pair is its ``probs`` entry. Returns an "expert" layout
    Routing (R = G * E * C).
    """
    xp, device = clean.xp, clean.device
    num_groups, group_size = clean.num_groups, clean.group_size
    finite = clean.finite_rows[..., None]
    probs = xp.where(finite, probs, xp.zeros_like(probs))
    routable = finite & (clean.values > -xp.inf)
    ranking = xp.where(routable, ranking, xp.full_like(ranking, -xp.inf))
    best = xp.argsort(-ranking, axis=1, stable=True)[:, :per_expert, :]  # (G, C, E)
    weights = xp.take_along_axis(probs, best, axis=1)
    taken_finite = xp.take_along_axis(routable, best, axis=1)
    experts = xp.broadcast_to(
        xp.arange(num_experts, dtype=xp.int32, device=device)[None, None, :], best.shape
    )
    expert_ids = xp.where(taken_finite, experts, xp.asarray(-1, dtype=xp.int32, device=device))
    weights = xp.where(taken_finite, weights, xp.zeros_like(weights))
    group_start = xp.arange(num_groups, dtype=xp.int32, device=device)[:, None, None] * group_size

    def expert_major(a: Array) -> Array:
        return xp.reshape(xp.permute_dims(a, (0, 2, 1)), (-1,))  # (G, C, E) -> (G*E*C,)

    num_tokens = num_groups * group_size
    return Routing(
        token_ids=expert_major(xp.astype(best, xp.int32) + group_start),
        expert_ids=expert_major(expert_ids),
        weights=expert_major(weights),
        choice_ids=expert_major(experts),
        probs=xp.reshape(probs, (num_tokens, num_experts)),
        finite_rows=xp.reshape(clean.finite_rows, (-1,)),
        num_tokens=num_tokens,
        num_experts=num_experts,
        layout="expert",
        slots=per_expert,
        num_groups=num_groups,
    )
