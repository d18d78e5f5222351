"""Switch-style load balancing: :func:`load_balancing` and DeepSeek's
:func:`sequence_load_balancing`, one computation (``_balance``) in three conventions."""

from __future__ import annotations

import math
from typing import Literal

from array_api_compat import array_namespace

from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_routing,
    valid_tokens,
)
from moerouter.losses._shared import (
    _CONVENTIONS,
    Convention,
    Count,
    _choice_counts,
    _normalised_scores,
)
from moerouter.routing import Routing

__all__ = ["load_balancing", "sequence_load_balancing"]


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


@fill_doc
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
    %(mask)s
    convention : {"deepseek", "megatron"}
        How sequences of different valid lengths are normalised.
    count : {"top_k", "choices"}
        What :math:`\mathbb{1}\{i \in \mathrm{TopK}(s_t)\}` counts, as in :func:`load_balancing`.

    Returns
    -------
    %(masked_scalar)s

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
