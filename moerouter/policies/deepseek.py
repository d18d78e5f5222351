"""DeepSeek-style token choice: sigmoid scores, group-limited routing, aux-loss-free balancing."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._agnostic.scores import to_float32
from moerouter._agnostic.select import select_top_k
from moerouter._arrays import device_of
from moerouter._capabilities import PolicyCapabilities
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_fields,
    check_k,
    check_logits,
    check_positive_float,
    check_positive_int,
    check_token_layout_bounds,
    concrete_all,
    same_backend,
)
from moerouter.policies._common import check_capacity_options
from moerouter.policies._router import (
    RouterResult,
    run_router,
)
from moerouter.policies._token_choice import (
    DROP_POLICIES,
    call_capacity_factor,
    route_token_choice,
)
from moerouter.routing import Routing

__all__ = ["DeepSeekTopK", "ExpertBiasState", "expert_bias_init", "update_expert_bias"]


@PolicyCapabilities(
    scores=("sigmoid", "softmax"), capacity="optional", expert_groups=True, causal=True
)
@dataclass(frozen=True)
class DeepSeekTopK:
    r"""DeepSeek-V3 token choice: sigmoid scores, group-limited top-k, selection-only bias.

    For a token with logits :math:`\ell \in \mathbb{R}^E` (DeepSeek-V3, arXiv 2412.19437;
    ``deepseek-ai/DeepSeek-V3`` ``inference/model.py::Gate``):

    .. math::

        s = \sigma(\ell) \ (\texttt{score="sigmoid"}) \ \text{or}\ \mathrm{softmax}(\ell)
        \ (\text{DeepSeek-V2}), \qquad u = s + b,

    where :math:`b \in \mathbb{R}^E` is the expert bias of auxiliary-loss-free balancing, used
    **for selection only**. With ``num_groups`` :math:`n_g > 1` the experts are split into
    :math:`n_g` contiguous groups of :math:`E / n_g`; group :math:`g` scores
    :math:`\sum \mathrm{top2}(u_{g})` (``group_score="top2_sum"``, DeepSeek-V3; the sum of all
    entries for groups of one expert), :math:`\max u_g` (``"max"``, DeepSeek-V2's device-limited
    routing, and DeepSeek-V3's ``Gate`` when it has no bias), or the sum of its
    :math:`\lfloor k / \texttt{topk\_groups} \rfloor` largest entries (``"topk_sum"``,
    Megatron-Core's ``group_limited_topk``, which generalises the top-2 sum: the two agree when
    :math:`\lfloor k / \texttt{topk\_groups} \rfloor = 2`, as for DeepSeek-V3's k = 8 over 4
    groups), and only the ``topk_groups`` best groups stay eligible. The token then picks
    :math:`\mathcal{K} = \mathrm{TopK}(u \text{ on eligible experts}, k)` and weighs them with the
    *unbiased* scores

    .. math::

        w_j = \gamma \, \frac{s_j}{\sum_{i \in \mathcal{K}} s_i} \quad (\texttt{normalize=True}),
        \qquad w_j = \gamma \, s_j \quad (\texttt{normalize=False}),

    with :math:`\gamma` = ``routed_scaling_factor`` (2.5 in the DeepSeek-V3 config [UNVERIFIED
    paper value]). The bias gets no gradient (selection is an argsort); the weights carry the
    gradient of :math:`s` back to the logits. Train the bias with :func:`update_expert_bias`.

    Ties go to the lower group and the lower expert index. Unlike :class:`TopK`, selection ranks
    the computed scores :math:`s + b` rather than the logits, as DeepSeek does, so two experts
    whose float32 scores round differently per backend may be chosen differently: decisions are
    identical across backends for inputs without such float32 near-ties (equal logits always tie
    exactly). A ``-inf`` logit is never chosen; if the eligible groups hold fewer than ``k``
    experts with finite logits the remaining slots get expert -1 and weight 0.

    Capacity, ``k`` and ``capacity_factor`` overrides per call, ``min_capacity`` and the drop
    policies behave as in :class:`TopK` ("probs" and "batch_priority" rank the unbiased scores).

    Parameters
    ----------
    num_experts : int
        ``E``; the logits' last dimension; divisible by ``num_groups``.
    k : int
        Experts per token, at most ``topk_groups * E / num_groups``.
    num_groups : int
        Expert groups ``n_g`` (DeepSeek-V3: 8 groups of 32).
    topk_groups : int, optional
        Groups a token may use (DeepSeek-V3: 4); default ``num_groups`` (no limit).
    score : {"sigmoid", "softmax"}
        Score function.
    normalize : bool
        Renormalise the k scores to sum to 1 before scaling.
    routed_scaling_factor : float
        ``gamma`` > 0, multiplies every weight.
    group_score : {"top2_sum", "max", "topk_sum"}
        How a group is scored; ``"topk_sum"`` needs ``k >= topk_groups``.
    capacity_factor, capacity_multiple_of, min_capacity, drop_policy, strict, capacity_rounding
        As in :class:`TopK` (``capacity_rounding="megatron"`` reproduces Megatron-Core's
        ``get_capacity``).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.DeepSeekTopK(num_experts=4, k=1, num_groups=2, topk_groups=1)
    >>> logits = xp.asarray([[0.0, 3.0, 2.0, 2.0]])
    >>> router(logits).expert_ids  # group {2, 3} scores higher than group {0, 1}
    Array([2], dtype=array_api_strict.int32)
    >>> router(logits, xp.asarray([0.0, 0.0, -1.0, 0.0])).expert_ids  # a bias moves the choice
    Array([1], dtype=array_api_strict.int32)
    """

    num_experts: int
    k: int
    num_groups: int = 1
    topk_groups: int | None = None
    score: Literal["sigmoid", "softmax"] = "sigmoid"
    normalize: bool = True
    routed_scaling_factor: float = 1.0
    group_score: Literal["top2_sum", "max", "topk_sum"] = "top2_sum"
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    min_capacity: int = 0
    drop_policy: Literal["position", "probs", "batch_priority"] = "position"
    strict: bool = False
    capacity_rounding: Literal["exact", "megatron"] = "exact"

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_positive_int(self.num_groups, "num_groups")
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups must divide num_experts = {self.num_experts}, got {self.num_groups}"
            )
        if self.topk_groups is not None:
            check_positive_int(self.topk_groups, "topk_groups")
            if self.topk_groups > self.num_groups:
                raise ValueError(
                    f"topk_groups must be <= num_groups = {self.num_groups}, got {self.topk_groups}"
                )
        check_k(self.k, self.eligible_experts, "topk_groups * num_experts / num_groups")
        check_choice(self.score, "score", ("sigmoid", "softmax"))
        check_choice(self.group_score, "group_score", ("top2_sum", "max", "topk_sum"))
        self._check_group_k(self.k)
        check_positive_float(self.routed_scaling_factor, "routed_scaling_factor")
        check_capacity_options(self, DROP_POLICIES)

    @property
    def eligible_experts(self) -> int:
        """Experts in the ``topk_groups`` groups a token may use."""
        groups = self.num_groups if self.topk_groups is None else self.topk_groups
        return groups * (self.num_experts // self.num_groups)

    def __call__(
        self,
        logits: Array,
        bias: Array | ExpertBiasState | None = None,
        *,
        k: int | None = None,
        capacity_factor: float | None = None,
    ) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E) with an optional selection bias (E,).

        ``bias`` is an array or an :class:`ExpertBiasState` (its ``bias``).

        ``k`` and ``capacity_factor``, when given, replace the constructor's values for this call.
        A non-finite ``bias`` raises a ValueError when its values can be read (one device sync on
        an accelerator). Under ``jax.jit`` or ``torch.compile`` it is not checked: a NaN or -inf
        entry then keeps that expert out of every selection (an all-NaN bias routes nothing),
        and a +inf entry puts it in every token's top k.
        """
        if k is None:
            k = self.k
        else:
            k = self._check_group_k(check_k(k, self.eligible_experts, "eligible experts"))
        capacity_factor = call_capacity_factor(self, capacity_factor)
        check_token_layout_bounds(
            logits, k, num_experts=self.num_experts, with_capacity=capacity_factor is not None
        )
        # The logits are checked first: their errors name them, not the bias.
        check_logits(logits, self.num_experts, columns_name="num_experts")
        if isinstance(bias, ExpertBiasState):
            bias = bias.bias
        checked_bias = None if bias is None else self._check_bias(bias, logits)
        rule = "renormalize" if self.normalize else "raw"
        limited = self.topk_groups is not None and self.topk_groups < self.num_groups
        # Selection on the scores (plus the bias, 0.0 when there is none), limited to the best
        # groups' experts when topk_groups < num_groups.
        decision: RouterResult = run_router(
            logits,
            k,
            num_columns=self.num_experts,
            columns_name="num_experts",
            strict=self.strict,
            score=self.score,
            weights=rule,
            bias=0.0 if checked_bias is None else checked_bias,
            eligible=functools.partial(self._eligible, k=k) if limited else None,
        )
        weights = decision.weights
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return route_token_choice(
            self,
            decision,
            decision.probs,
            decision.choice,
            decision.routed,
            weights,
            capacity_factor=capacity_factor,
            probs_masked=True,
            all_routed=decision.all_routed,
        )

    def _check_bias(self, bias: Array, logits: Array) -> Array:
        xp = same_backend(("bias", bias), ("logits", logits))
        if tuple(bias.shape) != (self.num_experts,):
            raise ValueError(
                f"bias must have shape (num_experts,) = ({self.num_experts},), "
                f"got {tuple(bias.shape)}"
            )
        if not xp.isdtype(bias.dtype, "real floating"):
            raise TypeError(f"bias must be a real floating dtype, got {bias.dtype}")
        bias = to_float32(bias, xp=xp)
        # NaN would silently keep its expert out of every selection while finite_rows says fine.
        if concrete_all(xp.isfinite(bias), xp=xp) is False:
            bad = int(xp.sum(xp.astype(~xp.isfinite(bias), xp.int32)))
            raise ValueError(
                f"bias must be finite, got {bad} non-finite entr{'y' if bad == 1 else 'ies'}"
            )
        return bias

    def _check_group_k(self, k: int) -> int:
        limited = self.topk_groups is not None and self.topk_groups < self.num_groups
        if limited and self.group_score == "topk_sum" and k < (self.topk_groups or 1):
            raise ValueError(
                f"group_score='topk_sum' sums the top k // topk_groups experts of a group, so k "
                f"must be >= topk_groups = {self.topk_groups}, got k = {k}"
            )
        return k

    def _eligible(self, selection: Array, *, k: int) -> Array:
        """``selection`` with every expert outside each token's ``topk_groups`` best groups at
        ``-inf`` (never chosen), same shape: the router slot's ``eligible``."""
        assert self.topk_groups is not None
        xp, device = array_namespace(selection), device_of(selection)
        num_groups = self.num_groups
        per_group = self.num_experts // num_groups
        grouped = xp.reshape(selection, (*selection.shape[:-1], num_groups, per_group))
        if self.group_score == "topk_sum":
            # Megatron-Core's group_limited_topk: the top k // topk_groups scores of the group.
            ascending = xp.sort(grouped, axis=-1)
            group_scores = xp.sum(ascending[..., per_group - k // self.topk_groups :], axis=-1)
        else:
            first, second = _top_two(grouped, xp=xp)
            group_scores = first if self.group_score == "max" or per_group == 1 else first + second
        best = select_top_k(group_scores, self.topk_groups, xp=xp)  # (G, S, topk_groups)
        group_ids = xp.arange(num_groups, dtype=best.dtype, device=device)
        # One comparison per kept group (topk_groups is small): no reduction over a short axis.
        kept = best[..., 0:1] == group_ids
        for rank in range(1, self.topk_groups):
            kept = kept | (best[..., rank : rank + 1] == group_ids)  # (G, S, num_groups)
        lowest = xp.asarray(-xp.inf, dtype=selection.dtype, device=device)
        return xp.reshape(xp.where(kept[..., None], grouped, lowest), selection.shape)


def _top_two(grouped: Array, *, xp: Any) -> tuple[Array, Array]:
    """The largest and the second largest entry along the last axis (``-inf`` when it has one).

    A tree of elementwise ``maximum`` / ``minimum`` over halves of that axis, moved first and
    made contiguous (one copy): no sort, and no reduction or slice along a short axis, both slow
    on NumPy. Equal to ``sorted[-1]`` and ``sorted[-2]`` of an ascending sort (a tied maximum is
    its own second; a NaN makes the first NaN), except that of two equal zeros either sign may
    come out, which no group order can tell apart.
    """
    *outer, size = grouped.shape
    axes = (grouped.ndim - 1, *range(grouped.ndim - 1))
    first = xp.reshape(xp.permute_dims(grouped, axes), (size, math.prod(outer)))
    second = None
    while first.shape[0] > 1:
        size = first.shape[0]
        half = size // 2
        left, right = first[:half, ...], first[half : 2 * half, ...]
        merged_first = xp.maximum(left, right)
        merged_second = xp.minimum(left, right)
        if second is not None:
            merged_second = xp.maximum(
                merged_second, xp.maximum(second[:half, ...], second[half : 2 * half, ...])
            )
        if size % 2:  # the odd last entry carries over unmerged
            last = first[2 * half :, ...]
            carried = xp.full_like(last, -xp.inf) if second is None else second[2 * half :, ...]
            merged_first = xp.concat([merged_first, last], axis=0)
            merged_second = xp.concat([merged_second, carried], axis=0)
        first, second = merged_first, merged_second
    if second is None:
        second = xp.full_like(first, -xp.inf)
    return xp.reshape(first, tuple(outer)), xp.reshape(second, tuple(outer))


class ExpertBiasState(NamedTuple):
    """The expert bias of auxiliary-loss-free balancing, carried from step to step.

    A named tuple of arrays, so it is a pytree under ``jax.jit`` and passes through
    ``torch.compile``. Build it with :func:`expert_bias_init`, update it with
    :func:`update_expert_bias`, route with ``DeepSeekTopK(...)(logits, state)``.

    Attributes
    ----------
    bias : array (..., E) float32
        :math:`b_e`, for selection only; one row per layer when it is ``(L, E)``.
    """

    bias: Array


def expert_bias_init(
    num_experts: int, *, num_layers: int | None = None, xp: Any, device: Any = None
) -> ExpertBiasState:
    """A zero expert bias: the state before the first update.

    Parameters
    ----------
    num_experts : int
        ``E``.
    num_layers : int, optional
        One bias row per layer, shape ``(L, E)``; ``(E,)`` when omitted.
    xp : namespace
        Array namespace of the training step (``numpy``, ``torch``, ``jax.numpy``, ...).
    device : optional
        Device of the training step.

    Returns
    -------
    ExpertBiasState

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> state = mr.expert_bias_init(3, xp=xp)
    >>> mr.update_expert_bias(state, xp.asarray([5, 1, 3]), 0.1).bias
    Array([-0.1,  0.1,  0. ], dtype=array_api_strict.float32)
    """
    check_positive_int(num_experts, "num_experts")
    shape: tuple[int, ...] = (num_experts,)
    if num_layers is not None:
        check_positive_int(num_layers, "num_layers")
        shape = (num_layers, num_experts)
    if xp is None or not hasattr(xp, "zeros"):
        raise TypeError(f"xp must be an array namespace, got {xp!r}")
    return ExpertBiasState(xp.zeros(shape, dtype=xp.float32, device=device))


def update_expert_bias(bias: Array | ExpertBiasState, tokens_per_expert: Array, rate: float) -> Any:
    r"""One step of DeepSeek-V3's auxiliary-loss-free balancing: the new expert bias.

    .. math::

        b_e \leftarrow b_e + \gamma \, \mathrm{sign}\big(\bar c - c_e\big),
        \qquad \bar c = \frac{1}{E} \sum_e c_e,

    so under-loaded experts (:math:`c_e < \bar c`) become more attractive and over-loaded ones
    less (DeepSeek-V3, arXiv 2412.19437, §2.1.2; Megatron-Core ``get_updated_expert_bias``).
    :math:`\gamma` = 1e-3 is the value DeepSeek-V3 reports for most of training [UNVERIFIED].
    A pure function, ``state -> new state``: the caller keeps the bias (and, in data-parallel
    training, sums ``tokens_per_expert`` over ranks first). The bias is only meant for
    :class:`DeepSeekTopK`'s selection; it never weighs an output.

    Parameters
    ----------
    bias : array (..., E), real floating, or ExpertBiasState
        Current bias, e.g. ``(E,)`` or one row per layer ``(L, E)``; or the state of
        :func:`expert_bias_init` holding it.
    tokens_per_expert : array (..., E)
        Assignments each expert received (integer or float, finite and >= 0), same backend,
        broadcastable to ``bias``; e.g. ``mr.stats.summary(routing)["tokens_per_expert"]``.
    rate : float
        ``gamma`` >= 0.

    Returns
    -------
    array or ExpertBiasState
        The new bias, dtype and shape of ``bias``; an :class:`ExpertBiasState` when ``bias`` is
        one.

    Raises
    ------
    ValueError
        A non-finite ``bias``, or a non-finite or negative count, when the values can be read
        (not under ``jax.jit`` or ``torch.compile``, where they propagate into the bias).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.update_expert_bias(xp.zeros(3), xp.asarray([5, 1, 3]), 0.1)
    Array([-0.1,  0.1,  0. ], dtype=array_api_strict.float64)
    """
    if isinstance(bias, ExpertBiasState):
        return ExpertBiasState(update_expert_bias(bias.bias, tokens_per_expert, rate))
    for name, value in (("bias", bias), ("tokens_per_expert", tokens_per_expert)):
        if not is_array_api_obj(value):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    try:
        xp = array_namespace(bias, tokens_per_expert)
    except TypeError as error:
        raise TypeError("bias and tokens_per_expert must be arrays of one backend") from error
    if not xp.isdtype(bias.dtype, "real floating"):
        raise TypeError(f"bias must be a real floating dtype, got {bias.dtype}")
    if bias.ndim < 1 or tokens_per_expert.ndim < 1:
        raise ValueError("bias and tokens_per_expert must have an expert axis (last dimension)")
    if tokens_per_expert.shape[-1] != bias.shape[-1]:
        raise ValueError(
            f"tokens_per_expert has {tokens_per_expert.shape[-1]} experts, bias has "
            f"{bias.shape[-1]}"
        )
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise TypeError(f"rate must be a number, got {type(rate).__name__}")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"rate must be a finite number >= 0, got {rate}")
    if tokens_per_expert.dtype == xp.bool or not xp.isdtype(
        tokens_per_expert.dtype, ("integral", "real floating")
    ):
        raise TypeError(
            f"tokens_per_expert must be an integer or real floating array, "
            f"got {tokens_per_expert.dtype}"
        )
    # One read of both (a device sync, skipped when traced); the parameter at fault is then named.
    counts_ok = xp.isfinite(tokens_per_expert) & (tokens_per_expert >= 0)
    if concrete_all(xp.all(xp.isfinite(bias)) & xp.all(counts_ok), xp=xp) is False:
        if not bool(xp.all(xp.isfinite(bias))):
            raise ValueError("bias must be finite")
        raise ValueError("tokens_per_expert must be finite and >= 0")
    load = xp.astype(tokens_per_expert, bias.dtype)
    offset = xp.mean(load, axis=-1, keepdims=True) - load
    return bias + rate * xp.sign(offset)
