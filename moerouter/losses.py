r"""Balancing losses, each a pure function of a :class:`~moerouter.Routing` (or of logits).

Notation: :math:`E'` router columns (real plus null experts), :math:`T` valid tokens (finite
logits and, when a ``mask`` is given, not padding), :math:`c_e` the number of choices of column
:math:`e` (before capacity drops; by default the times :math:`e` is among a token's top-k router
scores, as Megatron-Core and transformers count, see :func:`load_balancing`'s ``count``),
:math:`\hat p_{t,e} = p_{t,e} / \sum_j p_{t,j}` the router scores normalised per token (softmax
probabilities are unchanged; sigmoid scores are normalised as Megatron-Core does for its
auxiliary losses, with the sum floored at :math:`10^{-15}` where Megatron-Core adds
:math:`10^{-20}`, so that a token whose every logit is below about -37 keeps a finite gradient
on every backend) and :math:`P_e = \frac{1}{T}\sum_t \hat p_{t,e}`.

Every loss returns a float32 scalar array of the routing's backend. Every loss takes an optional
``mask`` of valid tokens, shape (T,) or (G, S), bool: masked tokens and rows with non-finite logits
contribute nothing, and every mean counts valid tokens only, so a padded batch gives the loss of
the batch without its padding. There is no registry of losses: add them to your objective with
your own coefficients, per layer, and use :func:`aggregate` to combine layers.

**Zero tokens.** A batch with no valid token (``T = 0``, ``G = 0`` groups, or every token masked
or non-finite) is legal, as an expert-parallel rank or a last micro-batch may hold none: every
loss then returns ``0.0``, a constant with a zero gradient, so it adds nothing to the objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._agnostic.scores import finite_rows
from moerouter._agnostic.select import bincount, top_k
from moerouter._arrays import check_index_bound, device_of
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_positive_int,
    check_routing,
    flat_mask,
    valid_tokens,
)
from moerouter.routing import Routing

__all__ = [
    "BalanceState",
    "accumulate",
    "aggregate",
    "balance_state_init",
    "entropy",
    "importance_loss",
    "load_balancing",
    "load_balancing_from_state",
    "load_loss",
    "null_load_balancing",
    "sequence_load_balancing",
    "z_loss",
]

Convention = Literal["megatron", "mixtral", "gshard"]
_CONVENTIONS = ("megatron", "mixtral", "gshard")
Count = Literal["top_k", "choices"]
_COUNTS = ("top_k", "choices")
# t2t's cv_squared adds this to the squared mean so that an all-zero vector gives 0, not NaN.
_CV_EPSILON = 1e-10
# Per-token score sums are floored here before normalising (see _normalised_scores).
_MIN_SCORE_SUM = 1e-15


# --------------------------------------------------------------------------------------------
# Shared pieces: argument checks, valid tokens, per-token normalised scores.
# --------------------------------------------------------------------------------------------


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


def _counted_choices(routing: Routing, count: str, xp: Any) -> tuple[Array, Array]:
    """(token_ids, column_ids) of the (token, column) pairs :math:`c_e` counts.

    ``"top_k"``: each token's ``k`` best columns by router score, as Megatron-Core and
    transformers count, whatever the policy chose; ``"choices"``: the routing's raw choices.
    An expert-layout routing has no per-token ``k``: its choices count.

    Equal scores go to the routing's own choices first, then to the lower column. Any order of
    equal scores is a top-k; this one makes the count exactly the routing's choices for every
    policy that chose the top-k of its scores, even where scores underflow to equal values on
    one backend and not on another (XLA flushes denormals to zero).
    """
    check_choice(count, "count", _COUNTS)
    if count == "choices" or routing.layout != "token":
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


def _choice_counts(
    routing: Routing, valid: Array, num_groups: int, xp: Any, count: str = "top_k"
) -> Array:
    """(G, E') float32 counted choices of valid tokens per group (G = 1 pools every group)."""
    num_columns = routing.num_choices
    check_index_bound("choice buckets", G=num_groups, **{"E'": num_columns})
    device = device_of(routing.choice_ids)
    # At least 1: with zero tokens there is no token id to divide.
    tokens_per_group = max(routing.num_tokens // max(num_groups, 1), 1)
    token_ids, column_ids = _counted_choices(routing, count, xp)
    chose = xp.take(valid, token_ids)
    group = token_ids // tokens_per_group
    # Choices of invalid tokens are not choices: give them an out-of-range id.
    no_choice = xp.asarray(-1, dtype=xp.int32, device=device)
    bucket = xp.where(chose, group * num_columns + column_ids, no_choice)
    counts = bincount(bucket, num_groups * num_columns, xp=xp, device=device)
    counts = xp.astype(counts, xp.float32)
    return xp.reshape(counts, (num_groups, num_columns))


# --------------------------------------------------------------------------------------------
# Switch-style losses: load_balancing, null_load_balancing, sequence_load_balancing.
# --------------------------------------------------------------------------------------------


def load_balancing(
    routing: Routing,
    *,
    convention: Convention = "megatron",
    mask: Array | None = None,
    count: Count = "top_k",
) -> Array:
    r"""Switch-style load-balancing loss :math:`E' \sum_e f_e P_e`.

    Conventions differ in how :math:`f_e` is normalised (reference/algorithms.md §12.2):

    - ``"megatron"`` (default, Megatron-Core's ``switch_load_balancing_loss_func``):
      :math:`f_e = c_e / \sum_{e'} c_{e'}`, the share of the :math:`T k` routed slots.
      1.0 at uniform routing, for any ``k``. DeepSpeed's top-k gate (``mean(me·ce)·E²/k``) and
      MegaBlocks' ``batched_load_balancing_loss`` (one layer) have the same normalisation.
    - ``"mixtral"`` (transformers' ``load_balancing_loss_func``: Mixtral, Qwen-MoE, OLMoE, ...):
      :math:`f_e = c_e / T`, so a token's ``k`` choices each count. Equals ``k`` at uniform
      routing. With ``mask`` it is transformers' ``attention_mask`` form.
    - ``"gshard"`` (Flaxformer ``_load_balancing_loss``, the T5X/Switch code): per group,
      :math:`E'^2 \cdot \mathrm{mean}_e(f_e P_e)` with :math:`f_e` the share of the group's
      tokens that chose :math:`e` among their ``k`` (a token counted once per expert), then
      averaged over the groups that hold a valid token. Equals ``k`` at uniform routing; with
      one group it equals ``"mixtral"``. For ``k = 1`` it is also GShard's ``l_aux`` as lingvo,
      V-MoE (``_gshard_auxiliary_loss``), DeepSpeed's top-1/top-2 gates and Tutel's
      ``gshard_loss`` compute it: those count only each token's *first* choice, which for
      ``k > 1`` differs from every convention here.

    :math:`P_e` averages the per-token normalised scores :math:`\hat p` (module docstring): for
    softmax routers these are the probabilities; for sigmoid routers (DeepSeek-V3) it is the
    normalisation Megatron-Core applies for its auxiliary losses (Megatron-LM issue #1438).

    What :math:`c_e` counts (``count``), for a token-layout routing with ``k`` slots:

    - ``"top_k"`` (default): the tokens whose ``k`` largest router scores (``routing.probs``,
      ties to the lower column) include :math:`e`, whatever the policy chose. Megatron-Core
      counts this for every aux loss (``compute_routing_scores_for_aux_loss``: a plain
      ``topk`` of the scores, without the expert bias and the group limit the routing used),
      transformers' ``load_balancing_loss_func`` recomputes the top-k of the softmax, and
      DeepSeek-V3's balance loss counts :math:`\mathrm{TopK}(s_t)` of the unbiased scores. For
      policies that pick the top-k of their scores (TopK, NullExperts, GShardTop2's first
      choice, ...) these are the routing's own choices; for a biased or group-limited
      :class:`~moerouter.DeepSeekTopK`, :class:`~moerouter.LocalityTopK`, Sinkhorn or random
      routing they are not.
    - ``"choices"``: the routing's raw choices (``choice_ids``): the experts the tokens were
      actually sent to, before capacity drops. DeepSeek-V2's device-limited balance loss counts
      "token t selects expert i" (paper §2.2.3, UNVERIFIED); use it as well for routers that do
      not choose by score (hash tables, Sinkhorn) when the loss should see the actual load.

    An expert-layout routing has no per-token ``k``: its assignments are counted either way.
    Equal scores go to the routing's own choices first, so for a policy that picked the top-k of
    its scores both counts are the same, on every backend. For one that did not, scores that
    underflow (a softmax probability below about :math:`10^{-38}`) can rank differently on a
    backend that flushes denormals to zero (XLA) than on others; ``"choices"`` is exact
    everywhere.

    Parameters
    ----------
    routing : Routing
        Any policy's output. For expert choice every expert is full, so ``f`` is uniform.
    convention : {"megatron", "mixtral", "gshard"}
        Normalisation of :math:`f_e`.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens; masked tokens count neither in :math:`f` nor in :math:`P`.
    count : {"top_k", "choices"}
        What :math:`c_e` counts: the top-k of the router scores, or the routing's choices.

    Returns
    -------
    array ()
        float32 scalar; differentiable with respect to the router probabilities.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0], [0.0, 1.0]]))
    >>> float(mr.losses.load_balancing(routing))
    1.0
    """
    return _balance(routing, convention=convention, pool_null=False, mask=mask, count=count)


def null_load_balancing(
    routing: Routing,
    *,
    null_mode: Literal["pooled", "per_expert"] = "pooled",
    convention: Convention = "megatron",
    mask: Array | None = None,
    count: Count = "top_k",
) -> Array:
    r"""AdaMoE's load-balancing loss over real and null experts (Zeng et al. 2024).

    - ``null_mode="pooled"`` (the official ``exp_1`` code and the authors' blog): the null
      experts' counts are replaced by their mean,
      :math:`c_j \leftarrow \frac{1}{m}\sum_{j' \in \mathrm{null}} c_{j'}`,
      so the nulls act as one averaged bucket and are not balanced against each other:
      :math:`L = E'[\sum_{i \in \mathrm{real}} f_i P_i + (F_{\mathrm{null}}/m) P_{\mathrm{null}}]`.
      With the default ``convention="megatron"`` this is exactly ``exp_1``'s loss.
    - ``null_mode="per_expert"``: every null column is an ordinary expert, which is what the
      official Mixtral run (``exp_2``) computed in effect; ``convention="mixtral"`` reproduces it.

    Parameters
    ----------
    routing : Routing
        Output of :class:`~moerouter.NullExperts` (any routing works; without null columns this is
        :func:`load_balancing`).
    null_mode : {"pooled", "per_expert"}
        How null experts are counted.
    convention : {"megatron", "mixtral", "gshard"}
        As in :func:`load_balancing`.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.
    count : {"top_k", "choices"}
        As in :func:`load_balancing`; the same for :class:`~moerouter.NullExperts` routings,
        which choose the top-k of their scores.

    Returns
    -------
    array ()
        float32 scalar.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.NullExperts(num_experts=2, num_null=2, k=1)
    >>> routing = router(xp.asarray([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]))
    >>> round(float(mr.losses.null_load_balancing(routing)), 4)
    1.4134
    """
    if null_mode not in ("pooled", "per_expert"):
        raise ValueError(f"null_mode must be 'pooled' or 'per_expert', got {null_mode!r}")
    return _balance(
        routing, convention=convention, pool_null=null_mode == "pooled", mask=mask, count=count
    )


def sequence_load_balancing(
    routing: Routing,
    *,
    alpha: float = 1.0,
    mask: Array | None = None,
    convention: Literal["deepseek", "megatron"] = "deepseek",
    count: Count = "top_k",
) -> Array:
    r"""DeepSeek's sequence-wise auxiliary loss (DeepSeek-V2/V3; algorithms.md §12.6).

    For each sequence (group) :math:`g` of a (G, S, E') routing, with :math:`T_g` valid tokens:

    .. math::

        f_{g,i} = \frac{E'}{k\,T_g} \sum_{t \in g} \mathbb{1}\{i \in \mathrm{TopK}(s_t)\},
        \qquad
        P_{g,i} = \frac{1}{T_g} \sum_{t \in g} \hat p_{t,i},
        \qquad
        L = \alpha \cdot \mathrm{mean}_g \sum_i f_{g,i} P_{g,i},

    the mean running over sequences that hold a valid token. It equals :func:`load_balancing`'s
    ``"megatron"`` form computed per sequence and averaged: 1.0 (times ``alpha``) at uniform
    routing. :math:`\mathrm{TopK}(s_t)` is the top-k of the router scores, not the biased or
    group-limited choice of a :class:`~moerouter.DeepSeekTopK` routing (DeepSeek-V3's formula,
    Megatron-Core's ``seq_aux_loss``); ``count="choices"`` counts the routing's choices instead
    (see :func:`load_balancing`). Sigmoid scores are normalised per token (:math:`\hat p`).
    DeepSeek-V3's :math:`\alpha = 10^{-4}` is **UNVERIFIED** against the paper.

    **Padding** (``convention``). Without a mask, or with sequences of equal valid length, both
    conventions give the same number. With uneven padding:

    - ``"deepseek"`` (default): each sequence is normalised by its own valid length
      :math:`T_g`, as the formula reads, and the mean runs over sequences holding a valid token.
    - ``"megatron"``: Megatron-Core's ``_apply_seq_aux_loss`` folds the sequences into one
      routing map and normalises every sequence by the mean valid length
      :math:`\bar T = \frac{1}{G}\sum_g T_g`, then divides by all :math:`G` sequences:
      :math:`L = \frac{\alpha}{G} \sum_g \frac{E'}{k \bar T^2} \sum_i c_{g,i}
      \sum_{t \in g} \hat p_{t,i}`. A short sequence then weighs less than a long one.

    Parameters
    ----------
    routing : Routing
        A token-choice routing of (G, S, E') logits: one group per sequence.
    alpha : float
        Coefficient :math:`\alpha` the loss is multiplied by.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.
    convention : {"deepseek", "megatron"}
        How sequences of different valid lengths are normalised.
    count : {"top_k", "choices"}
        What :math:`\mathbb{1}\{i \in \mathrm{TopK}(s_t)\}` counts, as in :func:`load_balancing`.

    Returns
    -------
    array ()
        float32 scalar.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    >>> routing = mr.TopK(num_experts=2, k=1)(logits)  # sequence 1 balanced, sequence 2 not
    >>> round(float(mr.losses.sequence_load_balancing(routing)), 4)
    1.2311
    >>> mask = xp.asarray([[True, True], [True, False]])  # sequence 2: one valid token
    >>> round(float(mr.losses.sequence_load_balancing(routing, mask=mask)), 4)
    1.2311
    >>> loss = mr.losses.sequence_load_balancing(routing, mask=mask, convention="megatron")
    >>> round(float(loss), 4)  # both sequences over the mean valid length 1.5
    1.2138
    """
    routing = check_routing(routing)
    if routing.layout != "token":
        raise ValueError(
            "sequence_load_balancing needs a token-choice routing (layout 'token'), "
            f"got layout {routing.layout!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite number, got {alpha!r}")
    check_choice(convention, "convention", ("deepseek", "megatron"))
    loss = _balance(
        routing,
        convention="megatron",
        pool_null=False,
        mask=mask,
        count=count,
        per_group=True,
        mean_length=convention == "megatron",
    )
    return loss * alpha if alpha != 1.0 else loss


def _balance(
    routing: Routing,
    *,
    convention: str,
    pool_null: bool,
    mask: Array | None,
    count: str = "top_k",
    per_group: bool = False,
    mean_length: bool = False,
) -> Array:
    routing = check_routing(routing)
    check_choice(convention, "convention", _CONVENTIONS)
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    num_columns = routing.num_choices
    num_groups = routing.num_groups if per_group or convention == "gshard" else 1
    tokens_per_group = routing.num_tokens // num_groups if num_groups else 0

    counts = _choice_counts(routing, valid, num_groups, xp, count)
    if pool_null and num_columns > routing.num_experts:
        real, null = counts[:, : routing.num_experts], counts[:, routing.num_experts :]
        pooled = xp.broadcast_to(xp.mean(null, axis=1, keepdims=True), null.shape)
        counts = xp.concat([real, pooled], axis=1)

    scores = _normalised_scores(routing.probs, valid, xp)
    scores = xp.reshape(scores, (num_groups, tokens_per_group, num_columns))
    valid_float = xp.astype(xp.reshape(valid, (num_groups, tokens_per_group)), xp.float32)
    tokens = xp.sum(valid_float, axis=1, keepdims=True)
    if mean_length:
        # Megatron-Core's seq_aux_loss: every sequence over the mean valid length, mean over all.
        sequences = max(num_groups, 1)
        mean_tokens = xp.clip(xp.sum(tokens) / sequences, min=1.0)
        prob_sums = xp.sum(scores, axis=1)
        per_group_loss = xp.sum(counts * prob_sums, axis=1) / (routing.slots * mean_tokens**2)
        return num_columns * xp.sum(per_group_loss) / sequences
    safe_tokens = xp.clip(tokens, min=1.0)
    mean_probs = xp.sum(scores, axis=1) / safe_tokens
    if convention == "megatron":
        total = xp.sum(counts, axis=1, keepdims=True)
        share = counts / xp.where(total > 0, total, xp.ones_like(total))
    else:
        share = counts / safe_tokens
    per_group_loss = num_columns * xp.sum(share * mean_probs, axis=1)
    # Average over the groups holding a valid token: a group of padding adds nothing.
    occupied = xp.astype(tokens[:, 0] > 0, xp.float32)
    return xp.sum(per_group_loss * occupied) / xp.clip(xp.sum(occupied), min=1.0)


# --------------------------------------------------------------------------------------------
# Global-batch accumulation: state in, state out.
# --------------------------------------------------------------------------------------------


class BalanceState(NamedTuple):
    """What :func:`load_balancing` needs from a batch, summed over micro-batches (or layers).

    A named tuple of arrays, so it is a pytree under ``jax.jit`` / ``jax.lax.scan`` and passes
    through ``torch.compile``. Build it with :func:`balance_state_init`, update it with
    :func:`accumulate`, read the loss with :func:`load_balancing_from_state`.

    Attributes
    ----------
    counts : array (E',) int32
        Counted choices :math:`c_e` of valid tokens (before capacity drops; see
        :func:`accumulate`'s ``count``).
    prob_sums : array (E',) float32
        :math:`\\sum_t \\hat p_{t,e}` over valid tokens (normalised scores).
    tokens : array () int32
        Valid tokens :math:`T`.
    """

    counts: Array
    prob_sums: Array
    tokens: Array


def balance_state_init(num_choices: int, *, xp: Any, device: Any = None) -> BalanceState:
    """An empty :class:`BalanceState` for routings with ``num_choices`` (E') columns.

    Parameters
    ----------
    num_choices : int
        :math:`E'`, the router's columns (real plus null experts).
    xp : namespace
        Array namespace of the routings that will be accumulated (``numpy``, ``torch``,
        ``jax.numpy``, ...). Required: there is no array to infer it from.
    device : optional
        Device of those routings.

    Returns
    -------
    BalanceState
        Zero counts, zero probability sums, zero tokens.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.losses.balance_state_init(4, xp=xp).counts
    Array([0, 0, 0, 0], dtype=array_api_strict.int32)
    """
    check_positive_int(num_choices, "num_choices")
    if xp is None or not hasattr(xp, "zeros"):
        raise TypeError(f"xp must be an array namespace, got {xp!r}")
    return BalanceState(
        counts=xp.zeros((num_choices,), dtype=xp.int32, device=device),
        prob_sums=xp.zeros((num_choices,), dtype=xp.float32, device=device),
        tokens=xp.zeros((), dtype=xp.int32, device=device),
    )


def _check_state(state: object) -> BalanceState:
    if not isinstance(state, BalanceState):
        raise TypeError(
            f"state must be a moerouter.losses.BalanceState, got {type(state).__name__}"
        )
    return state


def accumulate(
    state: BalanceState, routing: Routing, *, mask: Array | None = None, count: Count = "top_k"
) -> BalanceState:
    r"""Add one routing (a micro-batch, or a layer) to a :class:`BalanceState`.

    ``counts += c``, ``prob_sums += sum_t p̂_t``, ``tokens += T`` over the routing's valid
    tokens. A pure function: the old state is unchanged. After accumulating micro-batches
    :math:`B_1, \dots, B_n`, :func:`load_balancing_from_state` equals :func:`load_balancing` of
    the concatenated batch (for token-independent routings such as top-k without capacity).

    Parameters
    ----------
    state : BalanceState
        From :func:`balance_state_init` or a previous :func:`accumulate`.
    routing : Routing
        Any policy's output with ``E'`` columns; the backend of the state.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.
    count : {"top_k", "choices"}
        What the counts count, as in :func:`load_balancing` (Megatron-Core's
        ``global_aux_loss`` counts the top-k of the scores).

    Returns
    -------
    BalanceState
        The new state.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.TopK(num_experts=2, k=1)
    >>> state = mr.losses.balance_state_init(2, xp=xp)
    >>> state = mr.losses.accumulate(state, router(xp.asarray([[1.0, 0.0]])))
    >>> state = mr.losses.accumulate(state, router(xp.asarray([[0.0, 1.0]])))
    >>> state.counts, float(mr.losses.load_balancing_from_state(state))
    (Array([1, 1], dtype=array_api_strict.int32), 1.0)
    """
    state = _check_state(state)
    routing = check_routing(routing)
    if int(state.counts.shape[0]) != routing.num_choices:
        raise ValueError(
            f"state has {state.counts.shape[0]} columns but the routing has "
            f"{routing.num_choices} (E')"
        )
    xp = array_namespace(routing.probs, state.counts)
    valid = valid_tokens(routing, mask, xp)
    counts = _choice_counts(routing, valid, 1, xp, count)[0, :]
    prob_sums = xp.sum(_normalised_scores(routing.probs, valid, xp), axis=0)
    tokens = xp.sum(xp.astype(valid, xp.int32))
    return BalanceState(
        counts=state.counts + xp.astype(counts, xp.int32),
        prob_sums=state.prob_sums + prob_sums,
        tokens=state.tokens + xp.astype(tokens, xp.int32),
    )


def load_balancing_from_state(
    state: BalanceState,
    *,
    convention: Literal["megatron", "mixtral"] = "megatron",
    routing: Routing | None = None,
    mask: Array | None = None,
) -> Array:
    r"""The Switch loss :math:`E' \sum_e f_e P_e` of everything accumulated in ``state``.

    :math:`f_e` comes from the accumulated counts (``"megatron"``: share of all counted choices;
    ``"mixtral"``: counts over accumulated tokens), :math:`P_e` from the accumulated probability
    sums over accumulated tokens. The result equals :func:`load_balancing` on the concatenation
    of the accumulated routings. Two uses:

    - **Global-batch loss** (Qiu et al. 2025, "Demons in the Detail", arXiv:2501.11873;
      Megatron-Core's ``global_aux_loss``): with ``routing`` given, :math:`f_e` comes from the
      state (global counts over the micro-batches seen so far, which should include
      ``routing``'s) and :math:`P_e` from ``routing`` alone, so the gradient flows to this
      micro-batch's router only, as in Megatron-Core.
    - **Loss over concatenated layers** (transformers' Mixtral ``load_balancing_loss_func``
      concatenates every layer's router logits): accumulate each layer's routing into one
      state and read it with ``convention="mixtral"``.

    ``"gshard"`` is a per-group form and has no global-batch meaning; with one group it equals
    ``"mixtral"``.

    Parameters
    ----------
    state : BalanceState
        Accumulated with :func:`accumulate`.
    convention : {"megatron", "mixtral"}
        Normalisation of :math:`f_e`, as in :func:`load_balancing`.
    routing : Routing, optional
        Take :math:`P_e` from this routing instead of the state.
    mask : array (T,) or (G, S) bool, optional
        Valid tokens of ``routing`` (only with ``routing``).

    Returns
    -------
    array ()
        float32 scalar; 0 for an empty state.
    """
    state = _check_state(state)
    check_choice(convention, "convention", ("megatron", "mixtral"))
    xp = array_namespace(state.counts, state.prob_sums)
    counts = xp.astype(state.counts, xp.float32)
    num_columns = int(counts.shape[0])
    tokens = xp.clip(xp.astype(state.tokens, xp.float32), min=1.0)
    if routing is None:
        if mask is not None:
            raise ValueError("mask applies to routing, which was not given")
        mean_probs = state.prob_sums / tokens
    else:
        routing = check_routing(routing)
        if routing.num_choices != num_columns:
            raise ValueError(
                f"state has {num_columns} columns but the routing has {routing.num_choices} (E')"
            )
        valid = valid_tokens(routing, mask, xp)
        local_tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
        mean_probs = xp.sum(_normalised_scores(routing.probs, valid, xp), axis=0) / local_tokens
    if convention == "megatron":
        total = xp.sum(counts)
        share = counts / xp.where(total > 0, total, xp.ones_like(total))
    else:
        share = counts / tokens
    return num_columns * xp.sum(share * mean_probs)


# --------------------------------------------------------------------------------------------
# Shazeer et al. 2017: importance and load losses; the normal CDF they need.
# --------------------------------------------------------------------------------------------


def importance_loss(
    routing: Routing,
    *,
    source: Literal["weights", "probs"] = "weights",
    mask: Array | None = None,
) -> Array:
    r"""Importance loss: squared coefficient of variation of the per-expert importance.

    .. math::

        \mathrm{Importance}_e = \sum_t g_{t,e}, \qquad
        L_{\mathrm{imp}} = \mathrm{CV}(\mathrm{Importance})^2
        = \frac{\mathrm{Var}_e(\mathrm{Importance})}{\mathrm{Mean}_e(\mathrm{Importance})^2
        + 10^{-10}},

    with the population variance over experts (Shazeer et al., "Outrageously Large Neural
    Networks", ICLR 2017; tensor2tensor ``cv_squared``). 0 when every expert is equally important;
    :math:`E - 1` when one expert takes everything. The gate :math:`g` is

    - ``source="weights"`` (default; tensor2tensor ``NoisyTopKGating``): the combine weights,
      i.e. the gate after top-k (zero outside the chosen experts, and after capacity drops),
      over the :math:`E` real experts.
    - ``source="probs"`` (V-MoE ``_importance_auxiliary_loss``, Tutel ``load_importance_loss``):
      the full router probabilities :math:`p_{t,e}` over all :math:`E'` columns.

    V-MoE computes it per group and averages over groups; Tutel uses the unbiased variance
    (:math:`E - 1` in the denominator), which is :math:`E/(E-1)` times this value. With
    ``source="weights"`` the per-expert sum compares every assignment with every expert:
    memory :math:`O(T k E)` float32, ``k`` times the router probabilities.

    Parameters
    ----------
    routing : Routing
        Any policy's output.
    source : {"weights", "probs"}
        Which gate values make the importance.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.

    Returns
    -------
    array ()
        float32 scalar, differentiable with respect to the gate values.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0], [2.0, 0.0]]))
    >>> float(mr.losses.importance_loss(routing))  # all the importance on expert 0: E - 1
    1.0
    """
    routing = check_routing(routing)
    check_choice(source, "source", ("weights", "probs"))
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    if source == "probs":
        probs = xp.where(valid[:, None], routing.probs, xp.zeros_like(routing.probs))
        importance = xp.sum(probs, axis=0)
    else:
        counted = xp.take(valid, routing.token_ids) & (routing.expert_ids >= 0)
        weights = xp.where(counted, routing.weights, xp.zeros_like(routing.weights))
        experts = xp.arange(routing.num_experts, dtype=xp.int32, device=device_of(routing.probs))
        one_hot = xp.astype(routing.expert_ids[:, None] == experts[None, :], xp.float32)
        importance = xp.sum(weights[:, None] * one_hot, axis=0)
    return _cv_squared(importance, xp)


def load_loss(
    logits: Array,
    noisy_logits: Array,
    noise_std: Array | float,
    *,
    k: int,
    threshold: Literal["shazeer", "vmoe"] = "shazeer",
    mask: Array | None = None,
    xp: Any = None,
) -> Array:
    r"""Shazeer's smooth load loss: CV² of the expected number of tokens per expert under noise.

    With clean logits :math:`\ell`, the noisy logits :math:`h = \ell + \sigma \cdot
    \mathcal{N}(0, 1)` the router selected its top-k from, and the standard normal CDF
    :math:`\Phi`:

    .. math::

        P(t, e) = \Phi\Bigl(\frac{\ell_{t,e} - \theta_{t,e}}{\sigma_{t,e}}\Bigr), \qquad
        \mathrm{Load}_e = \sum_t P(t, e), \qquad
        L_{\mathrm{load}} = \frac{\mathrm{Var}_e(\mathrm{Load})}{\mathrm{Mean}_e(\mathrm{Load})^2
        + 10^{-10}},

    :math:`P(t, e)` being the probability that expert :math:`e` stays in token :math:`t`'s top-k
    when only its own noise is drawn again. The threshold :math:`\theta` is

    - ``"shazeer"`` (default; Shazeer et al. 2017, tensor2tensor ``_prob_in_top_k``): the
      :math:`(k+1)`-th largest noisy logit of the token when :math:`h_{t,e}` is above it (the
      expert is in the top-k), else the :math:`k`-th largest. Needs :math:`k < E`.
    - ``"vmoe"`` (V-MoE ``_load_auxiliary_loss``; Tutel's ``load_importance_loss`` does the same
      on softmax scores): the :math:`k`-th largest noisy logit for every expert.

    Where :math:`\sigma_{t,e} = 0` the probability is the indicator :math:`\ell_{t,e} >
    \theta_{t,e}`; a :math:`-\infty` logit has probability 0, and a :math:`-\infty` threshold
    gives every finite logit probability 1.
    :math:`\Phi(x) = \frac{1}{2}\operatorname{erfc}(-x/\sqrt{2})`; the array API has no
    ``erf``, so ``erfc`` is the Chebyshev fit of Press et al. (*Numerical Recipes*, §6.2,
    ``erfcc``), fractional error below :math:`1.2 \cdot 10^{-7}` everywhere, evaluated in
    float32 (tests check it against :func:`math.erfc`).

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Clean router logits, real floating dtype.
    noisy_logits : array
        The noisy logits the router used, same shape.
    noise_std : array or float
        :math:`\sigma`: a number, a 0-d array, or an array of the logits' shape (Shazeer's
        per-(token, expert) ``softplus(x W_noise) + eps``; V-MoE's ``noise_std / E``).
    k : int
        Experts per token.
    threshold : {"shazeer", "vmoe"}
        How :math:`\theta` is chosen.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens. Rows whose logits are not finite are left out too.
    xp : namespace, optional
        Inferred from the arrays when None.

    Returns
    -------
    array ()
        float32 scalar, differentiable with respect to the logits, the noisy logits and
        ``noise_std``.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[1.0, 0.0], [0.0, 1.0]])
    >>> float(mr.losses.load_loss(logits, logits, 1.0, k=1))  # symmetric: balanced
    0.0
    """
    if not is_array_api_obj(logits):
        raise TypeError(f"logits must be an array, got {type(logits).__name__}")
    if not is_array_api_obj(noisy_logits):
        raise TypeError(f"noisy_logits must be an array, got {type(noisy_logits).__name__}")
    arrays = [logits, noisy_logits] + ([noise_std] if is_array_api_obj(noise_std) else [])
    xp = array_namespace(*arrays) if xp is None else xp
    if logits.ndim not in (2, 3):
        raise ValueError(
            "logits must have shape (tokens, experts) or (groups, tokens, experts), "
            f"got shape {tuple(logits.shape)}"
        )
    if tuple(noisy_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"noisy_logits must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(noisy_logits.shape)}"
        )
    for name, value in (("logits", logits), ("noisy_logits", noisy_logits)):
        if not xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    num_experts = int(logits.shape[-1])
    check_choice(threshold, "threshold", ("shazeer", "vmoe"))
    check_positive_int(k, "k")
    largest_k = num_experts - 1 if threshold == "shazeer" else num_experts
    if k > largest_k:
        raise ValueError(
            f"k must be <= {largest_k} for threshold={threshold!r} with {num_experts} experts, "
            f"got {k}"
        )
    std_array: Any = noise_std
    if is_array_api_obj(std_array):
        if tuple(std_array.shape) not in ((), tuple(logits.shape)):
            raise ValueError(
                f"noise_std must be a number, a 0-d array or an array of shape "
                f"{tuple(logits.shape)}, got shape {tuple(std_array.shape)}"
            )
        if not xp.isdtype(std_array.dtype, "real floating"):
            raise TypeError(f"noise_std must be a real floating dtype, got {std_array.dtype}")
        std = xp.astype(std_array, xp.float32)
    elif isinstance(noise_std, int | float) and not isinstance(noise_std, bool):
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        std = xp.asarray(float(noise_std), dtype=xp.float32, device=device_of(logits))
    else:
        raise TypeError(f"noise_std must be a number or an array, got {type(noise_std).__name__}")

    clean = xp.reshape(xp.astype(logits, xp.float32), (-1, num_experts))
    noisy = xp.reshape(xp.astype(noisy_logits, xp.float32), (-1, num_experts))
    std = xp.reshape(std, (-1, num_experts)) if std.ndim > 0 else std
    shapes = (tuple(logits.shape[:-1]), (int(clean.shape[0]),))
    flat = flat_mask(mask, shapes, xp)
    valid = finite_rows(clean, xp=xp) & finite_rows(noisy, xp=xp)
    valid = valid if flat is None else valid & flat
    clean = xp.where(valid[:, None], clean, xp.zeros_like(clean))
    noisy = xp.where(valid[:, None], noisy, xp.zeros_like(noisy))

    ranked = xp.sort(noisy, axis=-1, descending=True)
    kth = ranked[:, k - 1 : k]
    if threshold == "shazeer":
        next_one = ranked[:, k : k + 1]
        theta = xp.where(noisy > next_one, next_one, kth)
    else:
        theta = kth
    positive = std > 0
    safe_std = xp.where(positive, std, xp.ones_like(std))
    # A -inf logit is never selected (P = 0); a -inf threshold admits every finite logit
    # (P = 1). Both are set apart before subtracting so that no inf - inf NaN (or its
    # gradient) appears.
    never = clean == -xp.inf
    always = (theta == -xp.inf) & ~never
    finite_clean = xp.where(never, xp.zeros_like(clean), clean)
    finite_theta = xp.where(theta == -xp.inf, xp.zeros_like(theta), theta)
    gap = finite_clean - finite_theta
    smooth = _normal_cdf(gap / safe_std, xp=xp)
    hard = xp.astype(gap > 0, xp.float32)
    prob = xp.where(positive, smooth, hard)
    prob = xp.where(always, xp.ones_like(prob), prob)
    prob = xp.where(valid[:, None] & ~never, prob, xp.zeros_like(prob))
    return _cv_squared(xp.sum(prob, axis=0), xp)


# Numerical Recipes' erfcc Chebyshev coefficients, innermost last (fractional error < 1.2e-7).
_ERFC_COEFFICIENTS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


def _erfc(x: Array, *, xp: Any) -> Array:
    """Complementary error function in float32 (Press et al., Numerical Recipes §6.2)."""
    # where, not abs: at x == 0 the gradient must come from one side, not be zeroed by sign(0).
    z = xp.where(x >= 0, x, -x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = xp.full_like(z, _ERFC_COEFFICIENTS[-1])
    for coefficient in reversed(_ERFC_COEFFICIENTS[1:-1]):
        poly = coefficient + t * poly
    poly = _ERFC_COEFFICIENTS[0] + t * poly
    tail = t * xp.exp(-z * z + poly)
    return xp.where(x >= 0, tail, 2.0 - tail)


def _normal_cdf(x: Array, *, xp: Any) -> Array:
    r"""Standard normal CDF :math:`\Phi(x) = \frac{1}{2}\operatorname{erfc}(-x/\sqrt{2})`."""
    return 0.5 * _erfc(-x * (1.0 / math.sqrt(2.0)), xp=xp)


# --------------------------------------------------------------------------------------------
# Entropy regulariser and z-loss.
# --------------------------------------------------------------------------------------------


def entropy(routing: Routing, *, mask: Array | None = None) -> Array:
    r"""Mean entropy (nats) of the router's per-token distribution.

    .. math::

        H = \frac{1}{T} \sum_t \Bigl( -\sum_e \hat p_{t,e} \log \hat p_{t,e} \Bigr),

    over valid tokens, with :math:`\hat p` the scores normalised per token (softmax probabilities
    as they are) and :math:`0 \log 0 = 0`. Between 0 (every token certain) and :math:`\log E'`
    (uniform). :func:`moerouter.stats.summary`'s ``router_entropy`` is the same number (except
    for tokens whose sigmoid scores sum below :math:`10^{-15}`, which the loss normalises by
    that floor to keep its gradient finite).

    **Sign convention:** this returns :math:`H \geq 0`. Adding ``+ coefficient * H`` to a loss
    that is minimised sharpens each token's routing (confident, specialised choices, as entropy
    penalties on gates do); adding ``- coefficient * H`` spreads it (exploration). It is a
    per-token quantity: it says nothing about balance across tokens, which the balancing losses
    measure.

    Parameters
    ----------
    routing : Routing
        Any policy's output.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens.

    Returns
    -------
    array ()
        float32 scalar, differentiable with respect to the router probabilities (an entry that
        is exactly 0 gets gradient 0).
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.zeros((3, 2)))
    >>> round(float(mr.losses.entropy(routing)), 4)  # log 2
    0.6931
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    scores = _normalised_scores(routing.probs, valid, xp)
    positive = scores > 0
    safe = xp.where(positive, scores, xp.ones_like(scores))
    plogp = xp.where(positive, scores * xp.log(safe), xp.zeros_like(scores))
    tokens = xp.clip(xp.sum(xp.astype(valid, xp.float32)), min=1.0)
    return -xp.sum(plogp) / tokens


def z_loss(logits: Array, *, mask: Array | None = None, xp: Any = None) -> Array:
    r"""Router z-loss (Zoph et al., ST-MoE, 2022).

    :math:`L_z = \frac{1}{T}\sum_t (\log\sum_j e^{\ell_{t,j}})^2` over valid tokens.

    Penalises large router logits to keep the softmax numerically tame. Computed in float32;
    rows holding NaN or +inf, or only -inf, are left out of the mean (as every policy routes them
    nowhere), and so are masked rows. Megatron-Core's ``z_loss_func`` (padding-mask aware),
    Flaxformer's ``_router_z_loss`` (sum over groups and tokens divided by their number) and
    transformers' Switch ``router_z_loss_func`` use the same normalisation.

    Parameters
    ----------
    logits : array (T, E') or (G, S, E')
        Router logits, any real floating dtype.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens: ``logits.shape[:-1]`` or flattened to (G·S,).
    xp : namespace, optional
        Array namespace; inferred from ``logits`` when None.

    Returns
    -------
    array ()
        float32 scalar.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> float(mr.losses.z_loss(xp.asarray([[0.0, 0.0]])))  # (log 2)^2
    0.480453...
    """
    xp = array_namespace(logits) if xp is None else xp
    if logits.ndim not in (2, 3):
        raise ValueError(
            "logits must have shape (tokens, experts) or (groups, tokens, experts), "
            f"got shape {tuple(logits.shape)}"
        )
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits must be a real floating dtype, got {logits.dtype}")
    values = xp.reshape(xp.astype(logits, xp.float32), (-1, logits.shape[-1]))
    shapes = (tuple(logits.shape[:-1]), (int(values.shape[0]),))
    flat = flat_mask(mask, shapes, xp)
    finite = finite_rows(values, xp=xp)
    finite = finite if flat is None else finite & flat
    values = xp.where(finite[:, None], values, xp.zeros_like(values))
    row_max = xp.max(values, axis=-1, keepdims=True)
    logsumexp = xp.log(xp.sum(xp.exp(values - row_max), axis=-1)) + row_max[:, 0]
    squares = xp.where(finite, logsumexp**2, xp.zeros_like(logsumexp))
    count = xp.clip(xp.sum(xp.astype(finite, xp.float32)), min=1.0)
    return xp.sum(squares) / count


# --------------------------------------------------------------------------------------------
# Combining layers.
# --------------------------------------------------------------------------------------------


def aggregate(
    per_layer: Sequence[Mapping[str, Array]] | Sequence[Array],
    *,
    weights: Sequence[float] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Any:
    r"""Combine per-layer losses (or per-layer dicts of losses) into one.

    ``reduction="sum"``: :math:`\sum_l w_l L_l`; ``reduction="mean"``:
    :math:`\sum_l w_l L_l / \sum_l w_l` (the plain mean when ``weights`` is None). Dicts are
    combined key by key and must all have the same keys.

    Peers differ here: Megatron-Core's tracker averages each loss over layers, MegaBlocks'
    ``batched_load_balancing_loss`` scales by :math:`1/L` over the layers of a pipeline stage,
    AdaMoE's ``exp_1`` sums layers (``reduction="sum"``), and transformers' Mixtral loss is taken
    over the *concatenated* layers, which is not a per-layer combination at all: use
    :func:`accumulate` over layers with :func:`load_balancing_from_state` for that.

    Parameters
    ----------
    per_layer : sequence of arrays, or sequence of dicts of str to array
        One entry per layer; arrays of one backend and shape (usually scalars).
    weights : sequence of float, optional
        One non-negative weight per layer; default all 1.
    reduction : {"mean", "sum"}
        Weighted mean or weighted sum.

    Returns
    -------
    array, or dict of str to array
        Same kind as the entries of ``per_layer``; gradients flow to every layer's loss.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> layers = [{"aux": xp.asarray(1.0), "z": xp.asarray(2.0)},
    ...           {"aux": xp.asarray(3.0), "z": xp.asarray(4.0)}]
    >>> {name: float(v) for name, v in mr.losses.aggregate(layers).items()}
    {'aux': 2.0, 'z': 3.0}
    >>> float(mr.losses.aggregate([xp.asarray(1.0), xp.asarray(3.0)], reduction="sum"))
    4.0
    """
    check_choice(reduction, "reduction", ("mean", "sum"))
    if isinstance(per_layer, Mapping) or is_array_api_obj(per_layer):
        raise TypeError("per_layer must be a sequence with one entry per layer")
    entries = list(per_layer)
    if not entries:
        raise ValueError("per_layer must hold at least one layer")
    if weights is None:
        factors = [1.0] * len(entries)
    else:
        factors = [float(w) for w in weights]
        if len(factors) != len(entries):
            raise ValueError(
                f"weights has {len(factors)} entries but per_layer has {len(entries)} layers"
            )
        if not all(math.isfinite(w) and w >= 0 for w in factors):
            raise ValueError(f"weights must be finite and >= 0, got {factors}")
    divisor = sum(factors) if reduction == "mean" else 1.0
    if reduction == "mean" and divisor <= 0:
        raise ValueError("weights must not all be 0 for reduction='mean'")

    def combine(values: list[Array], name: str) -> Array:
        for value in values:
            if not is_array_api_obj(value):
                raise TypeError(f"{name} must hold arrays, got {type(value).__name__}")
        array_namespace(*values)  # one backend, or a clear TypeError
        total = values[0] * factors[0]
        for value, factor in zip(values[1:], factors[1:], strict=True):
            total = total + value * factor
        return total / divisor if divisor != 1.0 else total

    if all(isinstance(entry, Mapping) for entry in entries):
        keys = list(entries[0])
        for index, entry in enumerate(entries):
            if set(entry) != set(keys):
                raise ValueError(
                    f"per_layer[{index}] has keys {sorted(entry)}, per_layer[0] has {sorted(keys)}"
                )
        return {
            key: combine([entry[key] for entry in entries], f"per_layer[*][{key!r}]")
            for key in keys
        }
    if any(isinstance(entry, Mapping) for entry in entries):
        raise TypeError("per_layer must hold only arrays or only dicts, not both")
    return combine(entries, "per_layer")
