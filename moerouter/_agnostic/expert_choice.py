"""Expert-choice selection, written once for every policy of the "expert" layout.

:class:`~moerouter.ExpertChoice` ranks tokens by probability,
:class:`~moerouter.SinkhornExpertChoice` by a balanced transport potential and
:class:`~moerouter.SparsityConstrainedExpertChoice` by a sparse transport plan; all three then let
every expert take its best tokens with :func:`select_per_expert`, so the rule "a -inf logit is
never routed to" holds for each of them by construction.
"""

from __future__ import annotations

from typing import Any

from moerouter._typing import Array


def select_per_expert(
    ranking: Array, probs: Array, routable: Array, *, per_expert: int, xp: Any, device: Any
) -> tuple[Array, Array, Array, Array]:
    """Every expert takes the ``per_expert`` routable tokens with the largest ``ranking``.

    ``ranking`` and ``probs`` are (G, S, E) float32 and ``routable`` (G, S, E) bool: whether the
    pair (token, expert) may be routed at all (a finite row and a logit above -inf). Per group and
    expert, the routable tokens are taken in descending ``ranking``, ties to the lower token index.
    An expert with fewer than ``per_expert`` routable tokens fills its remaining slots with its
    unroutable tokens in token order, as expert -1 with weight 0, so that the shape stays static
    (``R = G * E * C``) and no such pair is ever dispatched. A taken pair weighs its ``probs``.

    ``ranking`` must be above -inf and not NaN on routable pairs (a probability, a transport plan
    entry or a finite potential): only then is every routable token served before any padding.
    Whatever its values, an unroutable pair is never given an expert. New arrays go on ``device``.

    Returns
    -------
    token_ids, expert_ids, weights, choice_ids : arrays (G * E * C,)
        Expert-major (group, expert, slot) order; token ids count over all groups; ``choice_ids``
        is the expert of the slot, real or not (losses count the slots).
    """
    num_groups, group_size, num_experts = ranking.shape
    lowest = xp.asarray(-xp.inf, dtype=ranking.dtype, device=device)
    # Unroutable pairs all rank -inf: a stable sort keeps them after every routable token and in
    # token order among themselves.
    keyed = xp.where(routable, ranking, lowest)
    best = xp.argsort(-keyed, axis=1, stable=True)[:, :per_expert, :]  # (G, C, E)
    taken_routable = xp.take_along_axis(routable, best, axis=1)
    weights = xp.take_along_axis(probs, best, axis=1)
    weights = xp.where(taken_routable, weights, xp.zeros_like(weights))
    expert_range = xp.arange(num_experts, dtype=xp.int32, device=device)
    experts = xp.broadcast_to(expert_range[None, None, :], best.shape)
    expert_ids = xp.where(taken_routable, experts, xp.asarray(-1, dtype=xp.int32, device=device))
    group_start = xp.arange(num_groups, dtype=xp.int32, device=device)[:, None, None] * group_size
    token_ids = xp.astype(best, xp.int32) + group_start

    def expert_major(a: Array) -> Array:
        return xp.reshape(xp.permute_dims(a, (0, 2, 1)), (-1,))  # (G, C, E) -> (G*E*C,)

    return (
        expert_major(token_ids),
        expert_major(expert_ids),
        expert_major(weights),
        expert_major(experts),
    )
