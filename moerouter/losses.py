r"""Balancing losses, each a pure function of a :class:`~moerouter.Routing` (or of logits).

Notation: :math:`E'` router columns (real plus null experts), :math:`T` tokens with finite logits,
:math:`c_e` the number of choices of column :math:`e` (before capacity drops, as Megatron-Core and
transformers count), and :math:`P_e = \frac{1}{T}\sum_t p_{t,e}` the mean router probability.
Every loss returns a float32 scalar array of the routing's backend; rows with non-finite logits
are left out of every mean.
"""

from __future__ import annotations

from typing import Any, Literal

from array_api_compat import array_namespace

from moerouter._agnostic.select import bincount
from moerouter.policies._common import finite_rows
from moerouter.routing import Routing

__all__ = ["load_balancing", "null_load_balancing", "z_loss"]

Array = Any
Convention = Literal["megatron", "mixtral", "gshard"]
_CONVENTIONS = ("megatron", "mixtral", "gshard")


def load_balancing(routing: Routing, *, convention: Convention = "megatron") -> Array:
    r"""Switch-style load-balancing loss :math:`E' \sum_e f_e P_e`.

    Conventions differ in how :math:`f_e` is normalised (reference/algorithms.md §12.2):

    - ``"megatron"`` (default, Megatron-Core's ``switch_load_balancing_loss_func``):
      :math:`f_e = c_e / \sum_{e'} c_{e'}`, the share of the :math:`T k` routed slots.
      1.0 at uniform routing, for any ``k``.
    - ``"mixtral"`` (transformers' ``load_balancing_loss_func``): :math:`f_e = c_e / T`.
      Equals ``k`` at uniform routing.
    - ``"gshard"`` (GShard, Flaxformer, V-MoE): per group,
      :math:`E'^2 \cdot \mathrm{mean}_e(f_e P_e)` with :math:`f_e` the share of the group's tokens
      that chose :math:`e` (a token counted once per expert), then averaged over groups.
      Equals ``k`` at uniform routing; with one group it equals ``"mixtral"``.

    Parameters
    ----------
    routing : Routing
        Any policy's output. For expert choice every expert is full, so ``f`` is uniform.
    convention : {"megatron", "mixtral", "gshard"}
        Normalisation of :math:`f_e`.

    Returns
    -------
    array ()
        float32 scalar; differentiable with respect to the router probabilities.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0], [0.0, 1.0]]))
    >>> float(mr.losses.load_balancing(routing))
    1.0
    """
    return _balance(routing, convention=convention, pool_null=False)


def null_load_balancing(
    routing: Routing,
    *,
    null_mode: Literal["pooled", "per_expert"] = "pooled",
    convention: Convention = "megatron",
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

    Returns
    -------
    array ()
        float32 scalar.
    """
    if null_mode not in ("pooled", "per_expert"):
        raise ValueError(f"null_mode must be 'pooled' or 'per_expert', got {null_mode!r}")
    return _balance(routing, convention=convention, pool_null=null_mode == "pooled")


def _balance(routing: Routing, *, convention: str, pool_null: bool) -> Array:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moerouter.Routing, got {type(routing).__name__}")
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    xp = array_namespace(routing.probs)
    num_columns = routing.num_choices
    num_groups = routing.num_groups if convention == "gshard" else 1
    tokens_per_group = routing.num_tokens // num_groups

    # Choices of non-finite rows are not choices: give them an out-of-range id.
    chose = xp.take(routing.finite_rows, routing.token_ids)
    group = routing.token_ids // tokens_per_group
    bucket = xp.where(
        chose, group * num_columns + routing.choice_ids, xp.asarray(-1, dtype=xp.int32)
    )
    counts = xp.astype(bincount(bucket, num_groups * num_columns, xp=xp), xp.float32)
    counts = xp.reshape(counts, (num_groups, num_columns))
    if pool_null and num_columns > routing.num_experts:
        real, null = counts[:, : routing.num_experts], counts[:, routing.num_experts :]
        pooled = xp.broadcast_to(xp.mean(null, axis=1, keepdims=True), null.shape)
        counts = xp.concat([real, pooled], axis=1)

    probs = xp.reshape(routing.probs, (num_groups, tokens_per_group, num_columns))
    finite = xp.astype(xp.reshape(routing.finite_rows, (num_groups, tokens_per_group)), xp.float32)
    tokens = xp.clip(xp.sum(finite, axis=1, keepdims=True), min=1.0)
    mean_probs = xp.sum(probs, axis=1) / tokens
    if convention == "megatron":
        total = xp.sum(counts, axis=1, keepdims=True)
        share = counts / xp.where(total > 0, total, xp.ones_like(total))
    else:
        share = counts / tokens
    per_group = num_columns * xp.sum(share * mean_probs, axis=1)
    return xp.mean(per_group)


def z_loss(logits: Array, *, xp: Any = None) -> Array:
    r"""Router z-loss (Zoph et al., ST-MoE, 2022).

    :math:`L_z = \frac{1}{T}\sum_t (\log\sum_j e^{\ell_{t,j}})^2`.

    Penalises large router logits to keep the softmax numerically tame. Computed in float32;
    rows holding NaN or +inf, or only -inf, are left out of the mean (as every policy routes them
    nowhere). Megatron-Core's ``z_loss_func`` and Flaxformer's ``_router_z_loss`` use the same
    normalisation.

    Parameters
    ----------
    logits : array (T, E') or (G, S, E')
        Router logits, any real floating dtype.
    xp : namespace, optional
        Array namespace; inferred from ``logits`` when None.

    Returns
    -------
    array ()
        float32 scalar.

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
    finite = finite_rows(values, xp=xp)
    values = xp.where(finite[:, None], values, xp.zeros_like(values))
    row_max = xp.max(values, axis=-1, keepdims=True)
    logsumexp = xp.log(xp.sum(xp.exp(values - row_max), axis=-1)) + row_max[:, 0]
    squares = xp.where(finite, logsumexp**2, xp.zeros_like(logsumexp))
    count = xp.clip(xp.sum(xp.astype(finite, xp.float32)), min=1.0)
    return xp.sum(squares) / count
