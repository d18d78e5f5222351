"""Expert choice a decoder can use: batch expert choice in training, a causal rule at inference."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._agnostic.select import bincount, top_k
from moerouter._arrays import check_index_bound, device_of
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._validation import check_floating
from moerouter.policies._common import (
    check_capacity_policy_fields,
    check_choice,
    check_positive_int,
    clean_logits,
)
from moerouter.policies._token_choice import softmax, token_choice_routing
from moerouter.policies.expert_choice import ExpertChoice
from moerouter.routing import Routing

__all__ = [
    "CausalExpertChoice",
    "ThresholdState",
    "expert_choice_targets",
    "threshold_state_init",
    "update_thresholds",
]

Array = Any

MODES = ("threshold", "predictor")


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="always", causal=True)
@dataclass(frozen=True)
class CausalExpertChoice:
    r"""Expert choice in training, a causal per-token decision at inference.

    Expert choice (Zhou et al. 2022, :class:`ExpertChoice`) lets each expert take the
    :math:`C = \lceil \mathrm{cf} \cdot S / E \rceil` tokens of a group with the largest
    :math:`P_{t,e} = \mathrm{softmax}(\ell_t)_e`, so a token's route depends on later tokens and
    a decoder cannot use it to generate. This policy trains with batch expert choice
    (``training=True``: exactly :class:`ExpertChoice`'s routing) and routes causally at
    inference with one of the two remedies of Mixture-of-Depths (Raposo et al. 2024,
    arXiv:2404.02258, §3.5):

    - ``mode="threshold"``: token :math:`t` goes to expert :math:`e` when
      :math:`P_{t,e} \geq \tau_e`, with :math:`\tau_e` a running estimate of the C-th largest
      :math:`P_{\cdot,e}` of training groups (:func:`update_thresholds`, state in, state out;
      pass ``state.thresholds``). A threshold never set is :math:`+\infty`: that expert takes no
      token.
    - ``mode="predictor"``: token :math:`t` goes to expert :math:`e` when the caller's auxiliary
      classifier says it would have been in the expert's top-C, ``predictor_logits[t, e] > 0``.
      Train the classifier on a stop-gradient copy of the router's input with
      :func:`moerouter.losses.causal_predictor_loss` (binary cross-entropy against
      :func:`expert_choice_targets`).

    Either way the decision for a token reads that token only, and the weight is
    :math:`P_{t,e}`, as in training. Inference routings have the "token" layout with ``E``
    slots per token (its experts in descending logit order, ties to the lower index; the slots
    that do not pass are -1): a token may reach 0 to ``E`` experts and an expert's load is not
    capped, only steered to about ``C`` per ``S`` tokens by the thresholds or the predictor.
    Threshold decisions compare probabilities computed with each backend's own ``exp``, so they
    agree across backends for inputs with no :math:`P_{t,e}` within float32 rounding of
    :math:`\tau_e`.

    Parameters
    ----------
    %(num_experts_logits)s
    capacity_factor : float
        ``cf`` > 0 of the training-time expert choice.
    mode : {"threshold", "predictor"}
        The inference rule.
    capacity_multiple_of : int
        As in :class:`ExpertChoice`.
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.CausalExpertChoice(num_experts=2, capacity_factor=1.0)
    >>> logits = xp.asarray([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    >>> state = mr.policies.threshold_state_init(2, xp=xp)
    >>> state = mr.policies.update_thresholds(state, router(logits, training=True))
    >>> router(logits, state.thresholds).expert_ids
    Array([ 0, -1,  0, -1,  1, -1,  1, -1], dtype=array_api_strict.int32)
    """

    num_experts: int
    capacity_factor: float = 2.0
    mode: Literal["threshold", "predictor"] = "threshold"
    capacity_multiple_of: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        check_capacity_policy_fields(self)
        check_choice(self.mode, "mode", MODES)

    @property
    def batch_policy(self) -> ExpertChoice:
        """The training-time rule: batch :class:`ExpertChoice` with the same parameters."""
        return ExpertChoice(
            self.num_experts,
            self.capacity_factor,
            capacity_multiple_of=self.capacity_multiple_of,
            strict=self.strict,
        )

    def capacity(self, group_size: int) -> int:
        """``C``: tokens each expert takes from a group of ``group_size`` in training."""
        return self.batch_policy.capacity(group_size)

    def __call__(
        self,
        logits: Array,
        thresholds: Array | None = None,
        predictor_logits: Array | None = None,
        *,
        training: bool = False,
    ) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E): batch expert choice with ``training=True``,
        else causally from ``thresholds`` (E,) or ``predictor_logits`` (shape of ``logits``)."""
        if training:
            if thresholds is not None or predictor_logits is not None:
                raise ValueError(
                    "training=True routes by batch expert choice: pass neither thresholds "
                    "nor predictor_logits"
                )
            return self.batch_policy(logits)
        wanted, other = (
            ("thresholds", "predictor_logits")
            if self.mode == "threshold"
            else ("predictor_logits", "thresholds")
        )
        given = {"thresholds": thresholds, "predictor_logits": predictor_logits}
        if given[other] is not None:
            raise ValueError(f"mode={self.mode!r} takes {wanted}, not {other}")
        if given[wanted] is None:
            raise ValueError(
                f"mode={self.mode!r} needs {wanted} at inference (or pass training=True)"
            )
        clean = clean_logits(
            logits, self.num_experts, columns_name="num_experts", strict=self.strict
        )
        xp = clean.xp
        probs = softmax(clean.values, xp=xp)
        if self.mode == "threshold":
            passes = probs >= _checked_thresholds(thresholds, self.num_experts, xp)
        else:
            passes = _checked_predictor(predictor_logits, logits, xp) > 0
        choice = top_k(clean.values, self.num_experts, xp=xp)
        chosen_logits = xp.take_along_axis(clean.values, choice, axis=-1)
        routed = (
            xp.take_along_axis(passes, choice, axis=-1)
            & (chosen_logits > -xp.inf)
            & clean.finite_rows[..., None]
        )
        return token_choice_routing(
            clean,
            probs,
            choice,
            routed,
            xp.take_along_axis(probs, choice, axis=-1),
            num_experts=self.num_experts,
        )


def _checked_thresholds(thresholds: Array, num_experts: int, xp: Any) -> Array:
    if not is_array_api_obj(thresholds):
        raise TypeError(f"thresholds must be an array, got {type(thresholds).__name__}")
    if tuple(thresholds.shape) != (num_experts,):
        raise ValueError(
            f"thresholds must have shape ({num_experts},), got {tuple(thresholds.shape)}"
        )
    if not xp.isdtype(thresholds.dtype, "real floating"):
        raise TypeError(f"thresholds must be a real floating dtype, got {thresholds.dtype}")
    return xp.astype(thresholds, xp.float32)


def _checked_predictor(predictor_logits: Array, logits: Array, xp: Any) -> Array:
    if not is_array_api_obj(predictor_logits):
        raise TypeError(f"predictor_logits must be an array, got {type(predictor_logits).__name__}")
    if tuple(predictor_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"predictor_logits must have the logits' shape {tuple(logits.shape)}, got "
            f"{tuple(predictor_logits.shape)}"
        )
    check_floating(predictor_logits, "predictor_logits")
    values = xp.astype(predictor_logits, xp.float32)
    return values if values.ndim == 3 else values[None, ...]


class ThresholdState(NamedTuple):
    """Running per-expert thresholds of :class:`CausalExpertChoice` (``mode="threshold"``).

    A named tuple of arrays (a pytree under ``jax.jit``). Build it with
    :func:`threshold_state_init`, update it with :func:`update_thresholds`.

    Attributes
    ----------
    thresholds : array (E,) float32
        :math:`\\tau_e`; :math:`+\\infty` before the first update.
    updates : array () int32
        Training groups folded in so far.
    """

    thresholds: Array
    updates: Array


def threshold_state_init(num_experts: int, *, xp: Any, device: Any = None) -> ThresholdState:
    """A state that has seen no training batch: every threshold :math:`+\\infty`.

    Parameters
    ----------
    num_experts : int
        ``E``.
    xp : namespace
        Array namespace of the training step.
    device : optional
        Device of the training step.

    Returns
    -------
    ThresholdState
    """
    check_positive_int(num_experts, "num_experts")
    if xp is None or not hasattr(xp, "full"):
        raise TypeError(f"xp must be an array namespace, got {xp!r}")
    return ThresholdState(
        thresholds=xp.full((num_experts,), math.inf, dtype=xp.float32, device=device),
        updates=xp.zeros((), dtype=xp.int32, device=device),
    )


def _without_gradient(array: Array) -> Array:
    # The state is a statistic, not a parameter: a torch tensor keeps no autograd history
    # from step to step (JAX users wrap the call in stop_gradient or compute it outside grad).
    detach = getattr(array, "detach", None)
    return detach() if callable(detach) else array


def update_thresholds(
    state: ThresholdState, routing: Routing, *, momentum: float = 0.99
) -> ThresholdState:
    r"""Fold one training routing into the running thresholds: the new state.

    For each group :math:`g` of the batch expert-choice routing, :math:`b_{g,e}` is the
    probability of the C-th (last) token expert :math:`e` took, the C-th largest
    :math:`P_{\cdot,e}` of the group; with :math:`\bar b_e` their mean over groups,

    .. math::

        \tau_e \leftarrow \begin{cases} \bar b_e & \text{first update} \\
            \mu \, \tau_e + (1 - \mu) \, \bar b_e & \text{afterwards,} \end{cases}

    an exponential moving average (:math:`\mu` = ``momentum``) started at the first batch, so
    that no made-up initial value biases it. A pure function; the routing's values are read
    without gradient.

    Parameters
    ----------
    state : ThresholdState
        From :func:`threshold_state_init` or a previous update.
    routing : Routing
        ``router(logits, training=True)`` of a :class:`CausalExpertChoice` (or an
        :class:`ExpertChoice` routing): expert layout.
    momentum : float
        :math:`\mu` in ``[0, 1)``.

    Returns
    -------
    ThresholdState
    """
    if not isinstance(state, ThresholdState):
        raise TypeError(
            f"state must be a moerouter.policies.ThresholdState, got {type(state).__name__}"
        )
    if not isinstance(routing, Routing) or routing.layout != "expert":
        raise TypeError("routing must be an expert-layout Routing (router(..., training=True))")
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise TypeError(f"momentum must be a number, got {type(momentum).__name__}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if int(state.thresholds.shape[0]) != routing.num_experts:
        raise ValueError(
            f"state has {state.thresholds.shape[0]} experts, the routing {routing.num_experts}"
        )
    xp = array_namespace(state.thresholds, routing.weights)
    shape = (routing.num_groups, routing.num_experts, routing.slots)
    weights = xp.reshape(_without_gradient(routing.weights), shape)
    batch = xp.mean(weights[:, :, -1], axis=0)
    average = momentum * state.thresholds + (1.0 - momentum) * batch
    first = state.updates == 0
    return ThresholdState(
        thresholds=xp.where(first, batch, average),
        updates=state.updates + routing.num_groups,
    )


def expert_choice_targets(routing: Routing) -> Array:
    """(T, E) float32: 1 where batch expert choice put token ``t`` in expert ``e``'s top-C.

    The predictor's labels (:func:`moerouter.losses.causal_predictor_loss`); no gradient.

    Parameters
    ----------
    routing : Routing
        ``router(logits, training=True)``: expert layout.

    Returns
    -------
    array (T, E) float32
    """
    if not isinstance(routing, Routing) or routing.layout != "expert":
        raise TypeError("routing must be an expert-layout Routing (router(..., training=True))")
    xp = array_namespace(routing.expert_ids)
    num_experts = routing.num_experts
    check_index_bound("token-expert cells", T=routing.num_tokens, E=num_experts)
    where = device_of(routing.expert_ids)
    cell = xp.where(
        routing.expert_ids >= 0,
        routing.token_ids * num_experts + routing.expert_ids,
        xp.asarray(-1, dtype=xp.int32, device=where),
    )
    taken = bincount(cell, routing.num_tokens * num_experts, xp=xp, device=where)
    return xp.reshape(xp.astype(taken > 0, xp.float32), (routing.num_tokens, num_experts))
