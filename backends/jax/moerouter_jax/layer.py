r"""A functional Mixture-of-Experts layer in plain JAX: parameters in, ``(y, losses)`` out.

::

    params = moe_init(key, hidden_size=d, intermediate_size=h, router=router)
    y, losses = moe_apply(params, x, router=router)                       # under jit/grad/vmap
    y, losses, state = moe_apply(params, x, router=router, state=state)   # stateful balancing

``params`` is a plain dict pytree: ``"gate"`` (d, E'), ``"w_in"`` (E, d, h or 2h for SwiGLU),
``"w_out"`` (E, h, d), and ``"shared_w_in"``/``"shared_w_out"`` for an always-on shared expert.
The experts run through :func:`moerouter_jax.grouped_matmul` on the valid rows only.

Stateful balancing is explicit state in, new state out (as optax threads optimizer state):

- ``expert_bias`` (E,) float32: DeepSeek-V3's auxiliary-loss-free balancing (Wang et al. 2024,
  "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"). The bias is added to
  the logits of the real experts **for selection only**; the combine weights and the losses use
  the unbiased logits. After each step :math:`b_e \leftarrow b_e + \gamma\,\mathrm{sign}(\bar c -
  c_e)` with :math:`c_e` the tokens routed to expert :math:`e` and :math:`\bar c` their mean
  (``bias_update_rate`` :math:`\gamma`; 0 leaves the bias alone).
- ``balance``: a :class:`moerouter.losses.BalanceState` (choice counts, probability sums and
  tokens over the micro-batches of one global batch), updated with
  :func:`moerouter.losses.accumulate`. ``losses["global_load_balancing"]`` is
  :func:`moerouter.losses.load_balancing_from_state` with this micro-batch's routing: :math:`f`
  from the accumulated counts (this micro-batch included; no gradient), :math:`P` from this
  micro-batch (Qwen's global-batch balancing, Qiu et al. 2025, "Demons in the Detail"). Reset
  with :func:`reset_accumulation` after each optimizer step.

The state is the core's :class:`moerouter.losses.MoEState` (``mr.losses.moe_state_init(E, E',
xp=jnp)``), updated by :func:`moerouter.losses.moe_state_update` (the core's
:func:`moerouter.update_expert_bias` and :func:`moerouter.losses.accumulate`), as in the torch
``MoE``. :func:`init_balance_state` gives the same state as a dict with the keys
``"expert_bias"`` and ``"balance"`` (the original form, kept): :func:`moe_apply` and
:func:`reset_accumulation` return the form they are given. The bias steers
:class:`moerouter.DeepSeekTopK` through its own ``bias`` argument, and :class:`moerouter.TopK`
through :func:`route` here. Other policies take no expert bias.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

import moerouter as mr
from moerouter.policies._expert_bias import route_with_expert_bias
from moerouter_jax._grouped import grouped_matmul
from moerouter_jax._kernels import device_of

__all__ = [
    "expert_mlp",
    "from_adamoe",
    "gate_logits",
    "init_balance_state",
    "moe_apply",
    "moe_init",
    "reset_accumulation",
    "route",
    "to_adamoe",
]

Array = Any
Activation = Literal["swiglu", "gelu", "relu", "silu"]
ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _num_choices(router: Any) -> int:
    return int(router.num_experts) + int(getattr(router, "num_null", 0))


def moe_init(
    key: Array,
    *,
    hidden_size: int,
    intermediate_size: int,
    router: Any,
    activation: Activation = "swiglu",
    shared_intermediate_size: int | None = None,
    null_init: Literal["tiled", "random"] = "tiled",
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Parameters of a MoE layer, uniform in :math:`\\pm 1/\\sqrt{\\mathrm{fan\\_in}}`.

    Parameters
    ----------
    key : jax.Array
        PRNG key.
    hidden_size, intermediate_size : int
        ``d`` and each expert's hidden width ``h``.
    router : moerouter policy
        Gives ``E`` and ``E' = E + num_null`` (the gate's columns).
    activation : {"swiglu", "gelu", "relu", "silu"}
        ``"swiglu"`` doubles ``w_in``'s columns (gate and up projections).
    shared_intermediate_size : int, optional
        Width of an always-on shared expert (DeepSeek, Qwen); none when omitted.
    null_init : {"tiled", "random"}
        With null experts, how the gate's null columns start: ``"tiled"`` (the AdaMoE code's
        initialisation) copies real column ``j mod E`` into null column ``j``; ``"random"``
        draws them like the real ones.
    dtype
        Of every parameter.

    Returns
    -------
    dict
        ``"gate"``, ``"w_in"``, ``"w_out"`` (and ``"shared_w_in"``, ``"shared_w_out"``).
    """
    _check_activation(activation)
    if null_init not in ("tiled", "random"):
        raise ValueError(f"null_init must be 'tiled' or 'random', got {null_init!r}")
    num_experts = int(router.num_experts)
    widen = 2 if activation == "swiglu" else 1

    def uniform(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    keys = jax.random.split(key, 5)
    params = {
        "gate": uniform(keys[0], (hidden_size, _num_choices(router)), hidden_size),
        "w_in": uniform(
            keys[1], (num_experts, hidden_size, widen * intermediate_size), hidden_size
        ),
        "w_out": uniform(keys[2], (num_experts, intermediate_size, hidden_size), intermediate_size),
    }
    if shared_intermediate_size is not None:
        params["shared_w_in"] = uniform(
            keys[3], (1, hidden_size, widen * shared_intermediate_size), hidden_size
        )
        params["shared_w_out"] = uniform(
            keys[4], (1, shared_intermediate_size, hidden_size), shared_intermediate_size
        )
    num_null = int(getattr(router, "num_null", 0))
    if num_null and null_init == "tiled":
        real = params["gate"][:, :num_experts]
        params["gate"] = mr.adamoe.tile_null_rows(real, num_null, axis=1)
    return params


def gate_logits(params: dict[str, Array], tokens: Array, router: Any) -> Array:
    """The router's logits ``(T, E')`` for ``tokens`` ``(T, d)``, in ``tokens``' dtype.

    With null experts the gate is applied ``E`` columns at a time: each product then has the
    shape of a top-k gate's, so a tiled null column rounds exactly as its real column (one wider
    product may not) and a layer converted by :func:`to_adamoe` routes as before.
    """
    gate = params["gate"].astype(tokens.dtype)
    num_experts = int(router.num_experts)
    if gate.shape[1] == num_experts:
        return tokens @ gate
    chunks = [
        gate[:, start : start + num_experts] for start in range(0, gate.shape[1], num_experts)
    ]
    return jnp.concatenate([tokens @ chunk for chunk in chunks], axis=-1)


def to_adamoe(params: dict[str, Array], router: Any, *, num_null: int, k: int) -> Any:
    """Convert a softmax top-k layer to ``num_null`` null experts and ``k`` choices per token.

    The gate gains ``num_null`` columns tiled from the real ones and the router becomes
    :func:`moerouter.adamoe.null_router` of ``router``: :func:`moe_apply` with the returned
    pair gives exactly the output it gave before (see :mod:`moerouter.adamoe` for the
    conditions, which are checked).

    Returns
    -------
    (params, router)
        New parameters (the others shared, not copied) and the :class:`moerouter.NullExperts`.

    Raises
    ------
    TypeError, ValueError
        Naming ``router``, ``num_null`` or ``k``.
    """
    null = mr.adamoe.null_router(router, num_null=num_null, k=k)
    return {**params, "gate": mr.adamoe.tile_null_rows(params["gate"], num_null, axis=1)}, null


def from_adamoe(params: dict[str, Array], router: Any, *, k: int) -> Any:
    """Undo :func:`to_adamoe`: drop the null columns and route with softmax top-``k``.

    Returns
    -------
    (params, router)
        New parameters and the :class:`moerouter.TopK` (from :func:`moerouter.adamoe.top_k_router`).
    """
    top_k = mr.adamoe.top_k_router(router, k=k)
    gate = mr.adamoe.drop_null_rows(params["gate"], int(router.num_experts), axis=1)
    return {**params, "gate": gate}, top_k


def _activate(hidden: Array, activation: str) -> Array:
    if activation == "swiglu":
        gate, up = jnp.split(hidden, 2, axis=-1)
        return jax.nn.silu(gate) * up
    if activation == "gelu":
        return jax.nn.gelu(hidden, approximate=False)
    if activation == "relu":
        return jax.nn.relu(hidden)
    return jax.nn.silu(hidden)


def expert_mlp(
    w_in: Array,
    w_out: Array,
    xe: Array,
    group_sizes: Array,
    *,
    activation: Activation = "swiglu",
    implementation: Literal["auto", "ragged_dot", "tiled"] = "auto",
) -> Array:
    """``E`` expert MLPs on expert-grouped rows: ``act(h @ w_in[e]) @ w_out[e]`` on e's rows.

    Rows past ``sum(group_sizes)`` (dropped or null-expert assignments) are zero and never
    multiplied. ``"swiglu"``: ``act([g, u]) = silu(g) * u`` (Mixtral, Qwen, DeepSeek).
    """
    _check_activation(activation)
    hidden = grouped_matmul(xe, w_in, group_sizes, implementation=implementation)
    return grouped_matmul(
        _activate(hidden, activation), w_out, group_sizes, implementation=implementation
    )


def init_balance_state(router: Any) -> dict[str, Any]:
    """Zero balancing state for :func:`moe_apply`: expert bias and a core ``BalanceState``.

    The dict form of ``mr.losses.moe_state_init(E, E', xp=jnp)`` (a
    :class:`moerouter.losses.MoEState`), which :func:`moe_apply` takes as well.
    """
    return dict(_state_init(router)._asdict())


def _state_init(router: Any) -> mr.losses.MoEState:
    return mr.losses.moe_state_init(int(router.num_experts), _num_choices(router), xp=jnp)


def _as_state(state: Any) -> mr.losses.MoEState:
    """The :class:`moerouter.losses.MoEState` of a state given as one or as a dict."""
    if isinstance(state, mr.losses.MoEState):
        return state
    if isinstance(state, dict):
        return mr.losses.MoEState(expert_bias=state["expert_bias"], balance=state["balance"])
    raise TypeError(
        f"state must be a moerouter.losses.MoEState or a dict, got {type(state).__name__}"
    )


def _like(state: mr.losses.MoEState, given: Any) -> Any:
    """``state`` in the form ``given`` came in (a dict keeps any other keys it had)."""
    return {**given, **state._asdict()} if isinstance(given, dict) else state


def reset_accumulation(state: Any) -> Any:
    """The state with its global-batch accumulation cleared (the expert bias is kept).

    Takes and returns a :class:`moerouter.losses.MoEState` or the dict of
    :func:`init_balance_state`.
    """
    current = _as_state(state)
    num_choices = int(current.balance.counts.shape[0])
    balance = mr.losses.balance_state_init(num_choices, xp=jnp)
    return _like(current._replace(balance=balance), state)


def route(router: Any, logits: Array, expert_bias: Array | None = None) -> mr.Routing:
    """``router(logits)``, with ``expert_bias`` (E,) added to the real experts' logits for
    selection only: weights and probabilities come from the unbiased logits.

    :class:`moerouter.DeepSeekTopK` applies the bias itself (``router(logits, bias)``). For
    :class:`moerouter.TopK` it is done here; capacity drops with ``drop_policy="probs"`` then
    rank the biased probabilities. The torch ``MoE`` routes through the same core function.
    """
    if expert_bias is None:
        return router(logits)
    return route_with_expert_bias(router, logits, jax.lax.stop_gradient(expert_bias))


def moe_apply(
    params: dict[str, Array],
    x: Array,
    *,
    router: Any,
    activation: Activation = "swiglu",
    state: mr.losses.MoEState | dict[str, Any] | None = None,
    bias_update_rate: float = 0.0,
    implementation: Literal["auto", "ragged_dot", "tiled"] = "auto",
) -> Any:
    """Apply a MoE layer: gate, ``router``, dispatch, experts, combine (+ shared expert).

    Parameters
    ----------
    params : dict
        From :func:`moe_init`.
    x : jax.Array (..., d)
        Tokens; leading axes are flattened to ``T``.
    router : moerouter policy
        Static: pass it with ``functools.partial`` or a closure under ``jax.jit``.
    activation : {"swiglu", "gelu", "relu", "silu"}
        As given to :func:`moe_init`.
    state : moerouter.losses.MoEState or dict, optional
        From :func:`moerouter.losses.moe_state_init` (or the dict of :func:`init_balance_state`).
        When given, the expert bias steers selection and the new state, in the form given, is
        returned as a third output.
    bias_update_rate : float
        DeepSeek's :math:`\\gamma` for the expert-bias update (0: keep the bias).
    implementation : {"auto", "ragged_dot", "tiled"}
        Of :func:`moerouter_jax.grouped_matmul`.

    Returns
    -------
    (y, losses) or (y, losses, new_state)
        ``y`` has the shape and dtype of ``x``. ``losses``: float32 scalars
        ``"load_balancing"`` (:func:`moerouter.losses.load_balancing`, or
        :func:`~moerouter.losses.null_load_balancing` with null experts) and ``"z_loss"``, plus
        ``"global_load_balancing"`` when ``state`` is given. Weight them yourself.

    Examples
    --------
    >>> import jax
    >>> import moerouter as mr
    >>> from moerouter_jax.layer import moe_apply, moe_init
    >>> router = mr.TopK(num_experts=4, k=2)
    >>> params = moe_init(jax.random.key(0), hidden_size=8, intermediate_size=16, router=router)
    >>> y, losses = moe_apply(params, jax.numpy.ones((5, 8)), router=router)
    >>> y.shape, sorted(losses)
    ((5, 8), ['load_balancing', 'z_loss'])
    """
    _check_activation(activation)
    tokens = x.reshape(-1, x.shape[-1])
    logits = gate_logits(params, tokens, router)
    current = None if state is None else _as_state(state)
    routing = route(router, logits, None if current is None else current.expert_bias)
    plan = mr.make_plan(routing)
    expert_out = expert_mlp(
        params["w_in"],
        params["w_out"],
        mr.dispatch(tokens, plan),
        plan.group_sizes,
        activation=activation,
        implementation=implementation,
    )
    y = mr.combine(expert_out, plan)
    if "shared_w_in" in params:
        everyone = jnp.full((1,), tokens.shape[0], jnp.int32, device=device_of(tokens))
        y = y + expert_mlp(
            params["shared_w_in"],
            params["shared_w_out"],
            tokens,
            everyone,
            activation=activation,
            implementation=implementation,
        )
    if getattr(router, "num_null", 0):
        balance = mr.losses.null_load_balancing(routing)
    else:
        balance = mr.losses.load_balancing(routing)
    losses = {"load_balancing": balance, "z_loss": mr.losses.z_loss(logits)}
    y = y.reshape(x.shape)
    if state is None or current is None:
        return y, losses
    new_state = jax.lax.stop_gradient(
        mr.losses.moe_state_update(current, routing, bias_update_rate=bias_update_rate)
    )
    losses["global_load_balancing"] = mr.losses.load_balancing_from_state(
        new_state.balance, routing=routing
    )
    return y, losses, _like(new_state, state)
