"""PyTorch modules: :class:`GroupedMLP` (the experts) and :class:`MoE` (a whole layer)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

import moerouter as mr
from moerouter.policies._expert_bias import route_with_expert_bias
from moerouter_torch._grouped import grouped_mm

__all__ = ["GroupedMLP", "MoE"]

_BALANCE_FIELDS = ("counts", "prob_sums", "tokens")  # of moerouter.losses.BalanceState

Activation = Literal["swiglu", "gelu", "relu", "silu"]


def _activate(hidden: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = hidden.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up
    if activation == "gelu":
        return nn.functional.gelu(hidden)
    if activation == "relu":
        return nn.functional.relu(hidden)
    return nn.functional.silu(hidden)


class GroupedMLP(nn.Module):
    """``E`` expert MLPs applied to expert-grouped rows, computing only the valid rows.

    Expert ``e`` maps its rows ``h -> act(h @ w_in[e]) @ w_out[e]``; with ``"swiglu"``,
    ``act([g, u]) = silu(g) * u`` (Mixtral, Qwen, DeepSeek). Rows past ``sum(group_sizes)``
    (dropped or null-expert assignments) are zero in the output and never multiplied.

    Parameters
    ----------
    num_experts : int
        ``E``.
    hidden_size : int
        ``d``, the width of a token row.
    intermediate_size : int
        ``h``, each expert's hidden width.
    activation : {"swiglu", "gelu", "relu", "silu"}
        Expert non-linearity.
    device, dtype
        Of the parameters.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: Activation = "swiglu",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu", "relu", "silu"):
            raise ValueError(
                f"activation must be 'swiglu', 'gelu', 'relu' or 'silu', got {activation!r}"
            )
        self.num_experts = num_experts
        self.activation = activation
        width_in = 2 * intermediate_size if activation == "swiglu" else intermediate_size
        factory = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, width_in, **factory))
        self.w_out = nn.Parameter(
            torch.empty(num_experts, intermediate_size, hidden_size, **factory)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(
            self.w_in, -1 / math.sqrt(self.w_in.shape[1]), 1 / math.sqrt(self.w_in.shape[1])
        )
        nn.init.uniform_(
            self.w_out, -1 / math.sqrt(self.w_out.shape[1]), 1 / math.sqrt(self.w_out.shape[1])
        )

    def forward(self, xe: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """``xe`` (R, d) grouped by expert, ``group_sizes`` (E,) int32 -> (R, d)."""
        hidden = _activate(grouped_mm(xe, self.w_in, group_sizes), self.activation)
        return grouped_mm(hidden, self.w_out, group_sizes)


class MoE(nn.Module):
    """A Mixture-of-Experts layer: gate, any moerouter policy, :class:`GroupedMLP`, shared experts.

    ``y = combine(experts(dispatch(x)))`` (+ a dense shared-expert MLP, as in DeepSeek and Qwen,
    when ``shared_intermediate_size`` is set). The gate is a bias-free linear layer producing the
    ``E'`` columns the policy reads (``E + num_null`` for :class:`moerouter.NullExperts`).

    Parameters
    ----------
    hidden_size : int
        ``d``.
    intermediate_size : int
        Width of each routed expert.
    router : moerouter policy
        :class:`moerouter.TopK`, :class:`moerouter.NullExperts`, :class:`moerouter.ExpertChoice`...
    activation : {"swiglu", "gelu", "relu", "silu"}
        Expert non-linearity (also of the shared experts).
    shared_intermediate_size : int, optional
        Width of an always-on shared expert; none when omitted.
    null_init : {"tiled", "random"}
        With null experts, how the gate's null rows start: ``"tiled"`` (the AdaMoE code's
        initialisation) copies real row ``j mod E`` into null row ``j``, ``"random"`` draws them
        like the real rows.
    track_balance : bool
        Hold a :class:`moerouter.losses.MoEState` as buffers (``expert_bias``,
        ``balance_counts``, ``balance_prob_sums``, ``balance_tokens``, saved in the
        ``state_dict``), as the JAX layer's ``MoE(track_balance=True)``: the expert bias steers
        selection (a :class:`moerouter.TopK` or :class:`moerouter.DeepSeekTopK` router), and
        ``losses`` gains ``"global_load_balancing"``. In training mode every call updates them
        with :func:`moerouter.losses.moe_state_update`; in eval mode they are read only. Clear
        the accumulated counts with :meth:`reset_accumulation` after each optimizer step.
    bias_update_rate : float
        DeepSeek's :math:`\\gamma` of the expert-bias update (0 keeps the bias).
    device, dtype
        Of the parameters (the state buffers are float32 and int32 on ``device``).

    Notes
    -----
    :meth:`to_adamoe` converts a trained softmax top-k layer to null experts without changing its
    output, and :meth:`from_adamoe` converts it back (:mod:`moerouter.adamoe`).

    Returns (from ``forward``)
    --------------------------
    (y, losses)
        ``y`` has the shape and dtype of ``x``; ``losses`` is a dict of float32 scalars:
        ``"load_balancing"`` (:func:`moerouter.losses.load_balancing`, or
        :func:`~moerouter.losses.null_load_balancing` when the router has null experts) and
        ``"z_loss"``, plus ``"global_load_balancing"``
        (:func:`moerouter.losses.load_balancing_from_state` of the accumulated counts, this
        call's included, with this call's probabilities) with ``track_balance``. Weight them
        yourself.
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
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if null_init not in ("tiled", "random"):
            raise ValueError(f"null_init must be 'tiled' or 'random', got {null_init!r}")
        if isinstance(bias_update_rate, bool) or not isinstance(bias_update_rate, int | float):
            raise TypeError(
                f"bias_update_rate must be a number, got {type(bias_update_rate).__name__}"
            )
        if not math.isfinite(bias_update_rate) or bias_update_rate < 0:
            raise ValueError(
                f"bias_update_rate must be a finite number >= 0, got {bias_update_rate}"
            )
        self.router = router
        self.track_balance = bool(track_balance)
        self.bias_update_rate = float(bias_update_rate)
        #: The top-k router :meth:`to_adamoe` replaced (:meth:`from_adamoe` restores it).
        self.converted_from: Any = None
        num_experts = router.num_experts
        num_null = getattr(router, "num_null", 0)
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, num_experts + num_null, bias=False, **factory)
        if num_null and null_init == "tiled":
            self._set_gate(mr.adamoe.tile_null_rows(self.gate.weight[:num_experts], num_null))
        self.experts = GroupedMLP(
            num_experts, hidden_size, intermediate_size, activation=activation, **factory
        )
        self.shared = None
        if shared_intermediate_size is not None:
            self.shared = GroupedMLP(
                1, hidden_size, shared_intermediate_size, activation=activation, **factory
            )
        self._reset_balance(device)

    def _reset_balance(self, device: Any) -> None:
        """(Re)build the state buffers at zero (their shapes follow the router's columns)."""
        if not self.track_balance:
            return
        zero = mr.losses.moe_state_init(
            self.router.num_experts, self.gate.out_features, xp=torch, device=device
        )
        self.register_buffer("expert_bias", zero.expert_bias)
        for field in _BALANCE_FIELDS:
            self.register_buffer(f"balance_{field}", getattr(zero.balance, field))

    @property
    def balance_state(self) -> mr.losses.MoEState | None:
        """The buffers as a :class:`moerouter.losses.MoEState` (the tensors themselves); None
        without ``track_balance``."""
        if not self.track_balance:
            return None
        balance = mr.losses.BalanceState(
            *(getattr(self, f"balance_{field}") for field in _BALANCE_FIELDS)
        )
        return mr.losses.MoEState(expert_bias=self.expert_bias, balance=balance)

    def _store(self, state: mr.losses.MoEState) -> None:
        with torch.no_grad():
            self.expert_bias.copy_(state.expert_bias)
            for field in _BALANCE_FIELDS:
                getattr(self, f"balance_{field}").copy_(getattr(state.balance, field))

    def reset_accumulation(self) -> MoE:
        """Clear the global-batch counts (the expert bias is kept). Returns the layer itself."""
        if self.track_balance:
            with torch.no_grad():
                for field in _BALANCE_FIELDS:
                    getattr(self, f"balance_{field}").zero_()
        return self

    def _set_gate(self, weight: torch.Tensor) -> None:
        # A new Parameter (the row count may change): build optimizers after converting.
        self.gate.weight = nn.Parameter(
            weight.detach().clone(), requires_grad=self.gate.weight.requires_grad
        )
        self.gate.out_features = weight.shape[0]

    def to_adamoe(self, num_null: int, k: int) -> MoE:
        """Route with ``num_null`` null experts and ``k`` choices; the output stays the same.

        The gate gains ``num_null`` rows tiled from the real ones (with ``track_balance`` the
        state buffers restart from zero) and the router becomes
        :func:`moerouter.adamoe.null_router` of the current one, whose conditions (a softmax
        :class:`moerouter.TopK` with ``normalize=True`` and no capacity; ``E`` divides
        ``num_null``; ``k`` in :func:`moerouter.adamoe.exact_k_range`) make the converted layer
        compute exactly what it computed before. The gate weight becomes a new parameter: build
        the optimizer after converting. Returns the layer itself.

        Raises
        ------
        TypeError, ValueError
            Naming ``router``, ``num_null`` or ``k`` (nothing is changed).
        """
        router = mr.adamoe.null_router(self.router, num_null=num_null, k=k)
        self._set_gate(mr.adamoe.tile_null_rows(self.gate.weight, num_null))
        self.converted_from, self.router = self.router, router
        self._reset_balance(self.gate.weight.device)  # one count per gate row
        return self

    def from_adamoe(self, k: int | None = None) -> MoE:
        """Drop the null experts: route with softmax top-``k`` over the real rows again.

        ``k`` defaults to the router :meth:`to_adamoe` replaced, which is restored as it was
        (the round trip gives back the same layer). Returns the layer itself.

        Raises
        ------
        TypeError
            Naming ``router`` when the layer has no null experts.
        ValueError
            Naming ``k`` when it is missing (the layer was built with null experts) or too large.
        """
        previous = self.converted_from
        if k is None:
            if previous is None:
                raise ValueError(
                    "k must be given: this layer was built with null experts, not converted"
                )
            k = previous.k
        router = mr.adamoe.top_k_router(self.router, k=k)
        if previous is not None and previous.k == k:
            router = previous  # the very router that was replaced
        self._set_gate(mr.adamoe.drop_null_rows(self.gate.weight, self.router.num_experts))
        self.router, self.converted_from = router, None
        self._reset_balance(self.gate.weight.device)
        return self

    def gate_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The router's logits ``(T, E')`` for ``tokens`` ``(T, d)``.

        With null experts the gate is applied ``E`` rows at a time: each product then has the
        shape of a top-k gate's, so a tiled null row rounds exactly as its real row (one wider
        product may not: BLAS blocks it differently) and a converted layer routes as before.
        """
        weight = self.gate.weight
        num_experts = self.router.num_experts
        if weight.shape[0] == num_experts:
            return self.gate(tokens)
        chunks = weight.split(num_experts)
        return torch.cat([nn.functional.linear(tokens, chunk) for chunk in chunks], dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (..., d) -> (``y`` (..., d), losses)."""
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.gate_logits(tokens)
        state = self.balance_state
        if state is None:
            routing = self.router(logits)
        else:
            routing = route_with_expert_bias(self.router, logits, state.expert_bias.detach())
        plan = mr.make_plan(routing)
        expert_out = self.experts(mr.dispatch(tokens, plan), plan.group_sizes)
        y = mr.combine(expert_out, plan)
        if self.shared is not None:
            everyone = torch.full((1,), tokens.shape[0], dtype=torch.int32, device=x.device)
            y = y + self.shared(tokens, everyone)
        if getattr(self.router, "num_null", 0):
            balance = mr.losses.null_load_balancing(routing)
        else:
            balance = mr.losses.load_balancing(routing)
        losses = {"load_balancing": balance, "z_loss": mr.losses.z_loss(logits)}
        if state is not None:
            with torch.no_grad():
                new_state = mr.losses.moe_state_update(
                    state, routing, bias_update_rate=self.bias_update_rate
                )
            losses["global_load_balancing"] = mr.losses.load_balancing_from_state(
                new_state.balance, routing=routing
            )
            if self.training:
                self._store(new_state)
        return y.reshape(x.shape), losses
