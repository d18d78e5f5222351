"""Routing diagnostics as plain arrays of the routing's backend (no host sync, jit-safe)."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from moerouter._agnostic.select import bincount
from moerouter.routing import Routing

__all__ = ["summary"]

Array = Any


def summary(routing: Routing) -> dict[str, Array]:
    r"""Diagnostics of one routing decision.

    Means over tokens count only rows with finite logits.

    Parameters
    ----------
    routing : Routing
        Any policy's output.

    Returns
    -------
    dict of str to array
        - ``tokens_per_expert`` (E,) int32: rows each real expert receives (after drops).
        - ``load_cv`` () float32: coefficient of variation of ``tokens_per_expert`` (std / mean).
        - ``load_max_over_mean`` () float32: the busiest expert's load over the mean load.
        - ``dropped_fraction`` () float32: share of choices of a real expert that route nowhere
          (capacity drops, -inf logits).
        - ``real_experts_per_token`` () float32: mean number of real experts a token reaches; the
          expert FLOPs are proportional to it (AdaMoE's "load").
        - ``real_experts_histogram`` (F + 1,) int32: tokens reaching 0, 1, ..., F real experts
          (``F`` = ``k``, or ``E`` for expert choice).
        - ``null_fraction`` () float32: share of choices that picked a null expert.
        - ``router_entropy`` () float32: mean entropy (nats) of each token's normalised scores.
        - ``nonfinite_rows`` () int32: tokens whose logits held NaN or +inf, or only -inf.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0], [2.0, 0.0]]))
    >>> mr.stats.summary(routing)["tokens_per_expert"]
    Array([2, 0], dtype=array_api_strict.int32)
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moerouter.Routing, got {type(routing).__name__}")
    xp = array_namespace(routing.probs)
    float32 = xp.float32
    finite = routing.finite_rows
    tokens = xp.clip(xp.sum(xp.astype(finite, float32)), min=1.0)

    real = routing.expert_ids >= 0
    tokens_per_expert = bincount(routing.expert_ids, routing.num_experts, xp=xp)
    load = xp.astype(tokens_per_expert, float32)
    mean_load = xp.clip(xp.mean(load), min=1e-30)

    chose = xp.take(finite, routing.token_ids)
    chose_real = chose & (routing.choice_ids < routing.num_experts)
    chose_null = chose & (routing.choice_ids >= routing.num_experts)
    num_choices = xp.clip(xp.sum(xp.astype(chose, float32)), min=1.0)
    num_real_choices = xp.clip(xp.sum(xp.astype(chose_real, float32)), min=1.0)
    dropped = xp.sum(xp.astype(chose_real & ~real, float32))

    real_token_ids = xp.where(real, routing.token_ids, xp.asarray(-1, dtype=xp.int32))
    per_token = bincount(real_token_ids, routing.num_tokens, xp=xp)
    per_token_finite = xp.where(finite, per_token, xp.asarray(-1, dtype=xp.int32))
    histogram = bincount(per_token_finite, routing.fan_in + 1, xp=xp)

    scores = routing.probs
    total = xp.sum(scores, axis=-1, keepdims=True)
    normalised = scores / xp.where(total > 0, total, xp.ones_like(total))
    plogp = xp.where(
        normalised > 0,
        normalised * xp.log(xp.where(normalised > 0, normalised, xp.ones_like(normalised))),
        xp.zeros_like(normalised),
    )
    entropy = -xp.sum(plogp, axis=-1)

    return {
        "tokens_per_expert": tokens_per_expert,
        "load_cv": xp.std(load) / mean_load,
        "load_max_over_mean": xp.max(load) / mean_load,
        "dropped_fraction": dropped / num_real_choices,
        "real_experts_per_token": xp.sum(xp.astype(per_token, float32)) / tokens,
        "real_experts_histogram": histogram,
        "null_fraction": xp.sum(xp.astype(chose_null, float32)) / num_choices,
        "router_entropy": xp.sum(xp.where(finite, entropy, xp.zeros_like(entropy))) / tokens,
        "nonfinite_rows": xp.astype(xp.sum(xp.astype(~finite, xp.int32)), xp.int32),
    }
