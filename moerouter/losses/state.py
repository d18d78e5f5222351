"""Global-batch balancing, optax-style: :class:`BalanceState` in, new state out.

:func:`balance_state_init` and :func:`accumulate` thread the counts of every micro-batch (and
rank); :func:`load_balancing_from_state` is the loss over the global batch. :class:`MoEState`
is what a MoE layer carries between steps (the expert bias of auxiliary-loss-free balancing and a
:class:`BalanceState`): :func:`moe_state_init` and :func:`moe_state_update`, used alike by the
JAX layer and the torch ``MoE``."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace

from moerouter._agnostic.select import bincount
from moerouter._arrays import device_of
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_positive_int,
    check_routing,
    valid_tokens,
)
from moerouter.losses._shared import (
    Count,
    _choice_counts,
    _normalised_scores,
)
from moerouter.policies.deepseek import update_expert_bias
from moerouter.routing import Routing

__all__ = [
    "BalanceState",
    "MoEState",
    "accumulate",
    "balance_state_init",
    "load_balancing_from_state",
    "moe_state_init",
    "moe_state_update",
]


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


class MoEState(NamedTuple):
    """The balancing state a MoE layer carries from step to step.

    A named tuple of arrays (and of a :class:`BalanceState`), so it is a pytree under
    ``jax.jit`` and passes through ``torch.compile``. Build it with :func:`moe_state_init`,
    update it with :func:`moe_state_update`. The JAX layer (``moerouter_jax.layer.moe_apply``)
    takes and returns it; the torch ``MoE`` holds its fields as buffers.

    Attributes
    ----------
    expert_bias : array (E,) float32
        DeepSeek-V3's auxiliary-loss-free expert bias, for selection only
        (:func:`moerouter.update_expert_bias`).
    balance : BalanceState
        Counts of the micro-batches of one global batch (:func:`accumulate`).
    """

    expert_bias: Array
    balance: BalanceState


def moe_state_init(
    num_experts: int, num_choices: int | None = None, *, xp: Any, device: Any = None
) -> MoEState:
    """A zero :class:`MoEState`: no bias, nothing accumulated.

    Parameters
    ----------
    num_experts : int
        ``E``, the real experts (the bias's length).
    num_choices : int, optional
        ``E'``, the router's columns (real plus null experts); ``num_experts`` when omitted.
    xp : namespace
        Array namespace of the layer.
    device : optional
        Device of the layer.

    Returns
    -------
    MoEState

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> state = mr.losses.moe_state_init(2, xp=xp)
    >>> state = mr.losses.moe_state_update(
    ...     state, mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0]])), bias_update_rate=0.1
    ... )
    >>> state.expert_bias
    Array([-0.1,  0.1], dtype=array_api_strict.float32)
    >>> state.balance.counts
    Array([1, 0], dtype=array_api_strict.int32)
    """
    check_positive_int(num_experts, "num_experts")
    if num_choices is None:
        num_choices = num_experts
    check_positive_int(num_choices, "num_choices")
    if num_choices < num_experts:
        raise ValueError(f"num_choices must be >= num_experts = {num_experts}, got {num_choices}")
    if xp is None or not hasattr(xp, "zeros"):
        raise TypeError(f"xp must be an array namespace, got {xp!r}")
    return MoEState(
        expert_bias=xp.zeros((num_experts,), dtype=xp.float32, device=device),
        balance=balance_state_init(num_choices, xp=xp, device=device),
    )


def moe_state_update(
    state: MoEState,
    routing: Routing,
    *,
    bias_update_rate: float = 0.0,
    mask: Array | None = None,
) -> MoEState:
    r"""One step of a MoE layer's balancing state: the new :class:`MoEState`.

    ``balance`` gains ``routing`` (:func:`accumulate`); the expert bias moves by
    :func:`moerouter.update_expert_bias` with :math:`c_e` the assignments expert :math:`e`
    actually served in ``routing`` (after capacity drops; null experts excluded). A pure
    function; the caller stops gradients (the JAX layer with ``jax.lax.stop_gradient``, the
    torch ``MoE`` by copying into buffers without autograd).

    Parameters
    ----------
    state : MoEState
        From :func:`moe_state_init` or a previous update.
    routing : Routing
        This micro-batch's routing (``E'`` columns, ``E`` real experts).
    bias_update_rate : float
        :math:`\gamma` >= 0 of the bias update (0 keeps the bias).
    mask : array (T,) or (G, S) bool, optional
        Valid tokens, for :func:`accumulate`.

    Returns
    -------
    MoEState
    """
    if not isinstance(state, MoEState):
        raise TypeError(f"state must be a moerouter.losses.MoEState, got {type(state).__name__}")
    routing = check_routing(routing)
    balance = accumulate(state.balance, routing, mask=mask)
    xp = array_namespace(routing.expert_ids, state.expert_bias)
    # Load: assignments actually served by each real expert (bincount ignores the -1s).
    served = bincount(
        routing.expert_ids, routing.num_experts, xp=xp, device=device_of(routing.expert_ids)
    )
    bias = update_expert_bias(state.expert_bias, xp.astype(served, xp.float32), bias_update_rate)
    return MoEState(expert_bias=bias, balance=balance)
