"""A Flax NNX module around the functional layer (optional: needs ``flax``).

``import moerouter_jax.nnx`` imports Flax; ``import moerouter_jax`` never does.
"""

from __future__ import annotations

from typing import Any, Literal

import jax.numpy as jnp
from flax import nnx

import moerouter as mr
from moerouter_jax.layer import (
    Activation,
    _state_init,
    from_adamoe,
    moe_apply,
    moe_init,
    to_adamoe,
)

__all__ = ["BalanceState", "MoE"]


class BalanceState(nnx.Variable):  # type: ignore[misc]
    """Non-trainable balancing state (expert bias, global-batch counts): not a ``nnx.Param``."""


_BALANCE_FIELDS = ("counts", "prob_sums", "tokens")  # of moerouter.losses.BalanceState


class MoE(nnx.Module):  # type: ignore[misc]
    """:func:`moerouter_jax.layer.moe_apply` as an NNX module: ``y, losses = moe(x)``.

        The gate and expert weights are ``nnx.Param``; with ``track_balance=True`` the expert bias
        and the global-batch counts are :class:`BalanceState` variables that every call updates
        (``bias_update_rate`` > 0 moves the bias; the fields of a
        :class:`moerouter.losses.MoEState`, updated by :func:`moerouter.losses.moe_state_update`
        as in the torch ``MoE``), and ``losses`` gains ``"global_load_balancing"``. Clear the
        counts with :meth:`reset_accumulation`. Filter them out of the optimizer with
        ``nnx.Param``.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from flax import nnx

    import moerouter as mr
        >>> import moerouter as mr
        >>> from moerouter_jax.nnx import MoE
        >>> moe = MoE(8, 16, mr.TopK(num_experts=4, k=2), rngs=nnx.Rngs(0))
        >>> y, losses = moe(jnp.ones((5, 8)))
        >>> y.shape
        (5, 8)
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        router: Any,
        *,
        activation: Activation = "swiglu",
        shared_intermediate_size: int | None = None,
        null_init: Literal["tiled", "random"] = "tiled",
        track_balance: bool = False,
        bias_update_rate: float = 0.0,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.router = router
        self.activation = activation
        self.bias_update_rate = bias_update_rate
        params = moe_init(
            rngs.params(),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            router=router,
            activation=activation,
            shared_intermediate_size=shared_intermediate_size,
            null_init=null_init,
            dtype=dtype,
        )
        #: The top-k router :meth:`to_adamoe` replaced (:meth:`from_adamoe` restores it).
        self.converted_from: Any = None
        self.param_names = tuple(sorted(params))
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))
        self.track_balance = track_balance
        self._reset_balance()

    def _reset_balance(self) -> None:
        if self.track_balance:
            state = _state_init(self.router)
            self.expert_bias = BalanceState(state.expert_bias)
            for field in _BALANCE_FIELDS:
                setattr(self, f"balance_{field}", BalanceState(getattr(state.balance, field)))

    def reset_accumulation(self) -> MoE:
        """Clear the global-batch counts (the expert bias is kept), as
        :func:`moerouter_jax.layer.reset_accumulation` does. Returns ``self``."""
        if self.track_balance:
            for field in _BALANCE_FIELDS:
                variable = getattr(self, f"balance_{field}")
                variable[...] = jnp.zeros_like(variable[...])
        return self

    def _convert(self, converted: tuple[dict[str, Any], Any]) -> None:
        params, self.router = converted
        self.gate = nnx.Param(params["gate"])
        self._reset_balance()  # the counts have one entry per gate column

    def to_adamoe(self, num_null: int, k: int) -> MoE:
        """:func:`moerouter_jax.layer.to_adamoe` in place: the output stays the same.

        The gate becomes a new ``nnx.Param`` (build the optimizer after converting); with
        ``track_balance`` the expert bias and the counts restart from zero. Returns ``self``.
        """
        previous = self.router
        self._convert(to_adamoe({"gate": self.gate[...]}, previous, num_null=num_null, k=k))
        self.converted_from = previous
        return self

    def from_adamoe(self, k: int | None = None) -> MoE:
        """:func:`moerouter_jax.layer.from_adamoe` in place; ``k`` defaults to the replaced
        router's, which is restored as it was. Returns ``self``.

        Raises
        ------
        TypeError
            Naming ``router`` when the module has no null experts.
        ValueError
            Naming ``k`` when it is missing (the module was built with null experts).
        """
        previous = self.converted_from
        if k is None:
            if previous is None:
                raise ValueError(
                    "k must be given: this module was built with null experts, not converted"
                )
            k = previous.k
        params, router = from_adamoe({"gate": self.gate[...]}, self.router, k=k)
        if previous is not None and previous.k == k:
            router = previous  # the very router that was replaced
        self._convert((params, router))
        self.converted_from = None
        return self

    def __call__(self, x: Any) -> tuple[Any, dict[str, Any]]:
        params = {name: getattr(self, name)[...] for name in self.param_names}
        if not self.track_balance:
            y, losses = moe_apply(params, x, router=self.router, activation=self.activation)
            return y, losses
        balance = mr.losses.BalanceState(
            *(getattr(self, f"balance_{field}")[...] for field in _BALANCE_FIELDS)
        )
        state = mr.losses.MoEState(expert_bias=self.expert_bias[...], balance=balance)
        y, losses, new_state = moe_apply(
            params,
            x,
            router=self.router,
            activation=self.activation,
            state=state,
            bias_update_rate=self.bias_update_rate,
        )
        self.expert_bias[...] = new_state.expert_bias
        for field in _BALANCE_FIELDS:
            getattr(self, f"balance_{field}")[...] = getattr(new_state.balance, field)
        return y, losses
