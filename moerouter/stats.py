"""Routing diagnostics as plain arrays of the routing's backend (no host sync, jit-safe).

Every function is pure and has static output shapes, so it runs inside ``jax.jit`` and
``torch.compile``; copy the values to the host when you choose to log them.

**Zero tokens.** A routing of no valid token (``T = 0``, ``G = 0``, or every token masked or
non-finite) gives zero counts and ``0.0`` for every mean, share and ratio (no ``NaN``): a rank or
micro-batch without tokens can be logged and reduced like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from moerouter._agnostic.select import bincount
from moerouter._arrays import check_index_bound, device_of, on_cpu
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import check_int, check_routing, concrete_all, valid_tokens
from moerouter.routing import Routing

__all__ = ["co_occurrence", "processed_by_at_least", "summary"]


@fill_doc
def summary(routing: Routing) -> dict[str, Array]:
    r"""Diagnostics of one routing decision.

    Means over tokens count only rows with finite logits.

    Parameters
    ----------
    %(routing)s

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
        - ``processed_by_at_least`` (F + 1,) float32: share of tokens reaching at least
          0, 1, ..., F real experts (:func:`processed_by_at_least`).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0], [2.0, 0.0]]))
    >>> mr.stats.summary(routing)["tokens_per_expert"]
    Array([2, 0], dtype=array_api_strict.int32)
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    device = device_of(routing.probs)
    float32 = xp.float32
    finite = routing.finite_rows
    tokens = xp.clip(xp.sum(xp.astype(finite, float32)), min=1.0)

    real = routing.expert_ids >= 0
    tokens_per_expert = bincount(routing.expert_ids, routing.num_experts, xp=xp, device=device)
    load = xp.astype(tokens_per_expert, float32)
    mean_load = xp.clip(xp.mean(load), min=1e-30)

    chose = xp.take(finite, routing.token_ids)
    chose_real = chose & (routing.choice_ids < routing.num_experts)
    chose_null = chose & (routing.choice_ids >= routing.num_experts)
    num_choices = xp.clip(xp.sum(xp.astype(chose, float32)), min=1.0)
    num_real_choices = xp.clip(xp.sum(xp.astype(chose_real, float32)), min=1.0)
    dropped = xp.sum(xp.astype(chose_real & ~real, float32))

    no_token = xp.asarray(-1, dtype=xp.int32, device=device)
    real_token_ids = xp.where(real, routing.token_ids, no_token)
    per_token = bincount(real_token_ids, routing.num_tokens, xp=xp, device=device)
    per_token_finite = xp.where(finite, per_token, no_token)
    histogram = bincount(per_token_finite, routing.fan_in + 1, xp=xp, device=device)
    at_least = _at_least_from_histogram(histogram, tokens, xp)

    scores = routing.probs
    total = xp.sum(scores, axis=-1, keepdims=True)
    normalised = scores / xp.where(total > 0, total, xp.ones_like(total))
    # 0 log 0 = 0: a zero entry reads log(1) = 0 (scores are never negative or NaN). Where every
    # entry is positive (softmax scores, as a rule) the guard is skipped, read on the host where
    # that is free: two fewer passes over (T, E'), the same values.
    if _positiveon_cpu(normalised, xp):
        plogp = normalised * xp.log(normalised)
    else:
        positive = normalised > 0
        plogp = normalised * xp.log(xp.where(positive, normalised, xp.ones_like(normalised)))
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
        "processed_by_at_least": at_least,
    }


def _positiveon_cpu(values: Array, xp: Any) -> bool:
    """Whether every entry of ``values`` is known to be above 0 (False when NaN, traced or on an
    accelerator, where reading it would cost a device synchronisation)."""
    if math.prod(values.shape) == 0 or not on_cpu(values):
        return False
    return concrete_all(xp.min(values) > 0, xp=xp) is True


def _reached(routing: Routing, valid: Array, xp: Any) -> Array:
    """(T, E) int32: 1 where valid token t reaches real expert e (after drops), else 0."""
    num_experts = routing.num_experts
    check_index_bound("token-expert pairs", T=routing.num_tokens, E=num_experts)
    device = device_of(routing.token_ids)
    counted = xp.take(valid, routing.token_ids) & (routing.expert_ids >= 0)
    pair = xp.where(
        counted,
        routing.token_ids * num_experts + routing.expert_ids,
        xp.asarray(-1, dtype=xp.int32, device=device),
    )
    counts = bincount(pair, routing.num_tokens * num_experts, xp=xp, device=device)
    once = xp.minimum(counts, xp.asarray(1, dtype=xp.int32, device=device))
    return xp.reshape(once, (routing.num_tokens, num_experts))


def _at_least_from_histogram(histogram: Array, tokens: Array, xp: Any) -> Array:
    """Share of tokens reaching at least t experts, t = 0 .. F, from the (F + 1,) histogram."""
    # at_least[t] = sum_{j >= t} histogram[j]: a reversed cumulative sum.
    reversed_cumsum = xp.cumulative_sum(xp.flip(xp.astype(histogram, xp.float32)))
    return xp.flip(reversed_cumsum) / tokens


@fill_doc
def co_occurrence(routing: Routing, *, mask: Array | None = None) -> Array:
    r"""How often each pair of real experts processes the same token.

    .. math::

        C_{i,j} = \bigl|\{t : t \text{ reaches } i \text{ and } t \text{ reaches } j\}\bigr|,

    counted over valid tokens (finite logits, and ``mask`` when given) and real experts after
    capacity drops (null experts and dropped choices excluded). ``C`` is symmetric; its diagonal
    is the number of tokens each expert processes. In the token layout these are the experts a
    token chose together (top-k pairs); in the expert layout, the experts that picked the same
    token. Merging methods (MC-SMoE) and expert-placement heuristics read it; a strongly
    clustered ``C`` says some experts are rarely used apart.

    Parameters
    ----------
    %(routing)s
    %(mask)s

    Returns
    -------
    array (E, E) int32
        Exact counts (built as a float32 product of 0/1 matrices, exact below 2**24 tokens).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=3, k=2)(xp.asarray([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0]]))
    >>> mr.stats.co_occurrence(routing)
    Array([[2, 1, 1],
           [1, 1, 0],
           [1, 0, 1]], dtype=array_api_strict.int32)
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    reached = xp.astype(_reached(routing, valid_tokens(routing, mask, xp), xp), xp.float32)
    pairs = xp.matmul(xp.matrix_transpose(reached), reached)
    return xp.astype(xp.round(pairs), xp.int32)


@fill_doc
def processed_by_at_least(
    routing: Routing, *, thresholds: Sequence[int] | None = None, mask: Array | None = None
) -> Array:
    r"""Share of tokens processed by at least :math:`t` real experts, for each threshold :math:`t`.

    .. math::

        r_t = \frac{1}{T} \bigl|\{t' : n_{t'} \geq t\}\bigr|,

    with :math:`n_{t'}` the real experts token :math:`t'` reaches (after drops) and :math:`T`
    the valid tokens. The Expert Choice paper (Zhou et al. 2022) reports this distribution, and
    V-MoE's expert-choice dispatcher logs it as ``ratio_processed_items_by_at_least_{t}_experts``
    for :math:`t = 1, 2, 4, \dots, E` (per group, averaged over groups; here over all valid
    tokens at once). :math:`r_0 = 1` (0 when no token is valid); :math:`1 - r_1` is the share
    of tokens no expert processes. Also meaningful for token choice (``t`` up to ``k``), where
    it shows drops and null experts.

    Parameters
    ----------
    %(routing)s
    thresholds : sequence of int, optional
        The :math:`t` to report, each in ``[0, F]`` with ``F = routing.fan_in`` (``k``, or ``E``
        for expert choice). Default ``0, 1, ..., F``.
    %(mask)s

    Returns
    -------
    array (len(thresholds),) float32
        Non-increasing in :math:`t` when the thresholds are increasing.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.ExpertChoice(num_experts=2, capacity_factor=1.0)
    >>> routing = router(xp.asarray([[3.0, 3.0], [3.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    >>> mr.stats.processed_by_at_least(routing)  # token 0: both experts; token 3: none
    Array([1.  , 0.75, 0.25], dtype=array_api_strict.float32)
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    fan_in = routing.fan_in
    if thresholds is None:
        chosen = list(range(fan_in + 1))
    else:
        if isinstance(thresholds, str) or not isinstance(thresholds, Sequence):
            raise TypeError(f"thresholds must be a sequence of int, got {thresholds!r}")
        chosen = []
        for position, value in enumerate(thresholds):
            t = check_int(value, f"thresholds[{position}]")
            if not 0 <= t <= fan_in:
                raise ValueError(f"thresholds must lie in [0, {fan_in}] (fan_in), got {t}")
            chosen.append(t)
    valid = valid_tokens(routing, mask, xp)
    per_token = xp.sum(_reached(routing, valid, xp), axis=1)
    device = device_of(per_token)
    per_token = xp.where(valid, per_token, xp.asarray(-1, dtype=per_token.dtype, device=device))
    histogram = bincount(per_token, fan_in + 1, xp=xp, device=device)
    tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
    at_least = _at_least_from_histogram(histogram, tokens, xp)
    if thresholds is None:
        return at_least
    return xp.take(at_least, xp.asarray(chosen, dtype=xp.int32, device=device))
