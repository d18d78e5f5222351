"""PyTorch modules: :class:`GroupedMLP` (the experts) and :class:`MoE` (a whole layer)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

import moerouter as mr
from moerouter_torch._grouped import grouped_mm

__all__ = ["GroupedMLP", "MoE"]

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
    device, dtype
        Of the parameters.

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
        ``"z_loss"``. Weight them yourself.
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
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if null_init not in ("tiled", "random"):
            raise ValueError(f"null_init must be 'tiled' or 'random', got {null_init!r}")
        self.router = router
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

    def _set_gate(self, weight: torch.Tensor) -> None:
        # A new Parameter (the row count may change): build optimizers after converting.
        self.gate.weight = nn.Parameter(
            weight.detach().clone(), requires_grad=self.gate.weight.requires_grad
        )
        self.gate.out_features = weight.shape[0]

    def to_adamoe(self, num_null: int, k: int) -> MoE:
        """Route with ``num_null`` null experts and ``k`` choices; the output stays the same.

        The gate gains ``num_null`` rows tiled from the real ones and the router becomes
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
        routing = self.router(logits)
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
        return y.reshape(x.shape), losses
