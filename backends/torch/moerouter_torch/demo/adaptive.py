"""The adaptive-compute peers of AdaMoE as demo routers: top-p, ReLU routing, causal expert choice.

``moerouter_torch.MoE`` calls ``router(logits)`` and weighs the load-balancing and z losses
itself; these policies need more during fine-tuning (a loss of their own, state carried from step
to step, the layer's input for a predictor) and causal expert choice routes differently in
training and at inference. :class:`AdaptiveRouter` is that glue: an ``nn.Module`` put in the
layer's ``router`` slot (so ``model.train()``/``eval()`` switch its mode and its state and
predictor live in the model's state dict). The demo's block adds :meth:`AdaptiveRouter.take_losses`
to the layer's losses; evaluation re-runs :meth:`AdaptiveRouter.route` on what it captured.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import moerouter as mr
from moerouter_torch.nn import MoE

__all__ = [
    "AdaptiveRouter",
    "CausalExpertChoiceRouter",
    "ReLURouter",
    "TopPRouter",
    "causal_agreement",
]

# Huang et al. 2024: dynamic (entropy) loss weight beta = 1e-4.
DYNAMIC_WEIGHT = 1e-4
# ReMoE's multiplier; its lambda_0 = 1e-8 needs ~100 steps of x1.2 to matter, and the demo
# fine-tunes 50: start where the L1 term is already a few percent of the task loss's gradient.
L1_MULTIPLIER = 1.2
L1_START = 1e-3
# Running C-th-score thresholds: a time constant of ~10 training batches (0.99, the library's
# default, would still be averaging the first batches after a 50-step fine-tune).
THRESHOLD_MOMENTUM = 0.9
# The predictor is a fresh classifier: it learns at this multiple of the fine-tuning rate.
PREDICTOR_LR_SCALE = 10.0


class AdaptiveRouter(nn.Module):
    """A policy with its fine-tuning losses (base class; subclasses say which).

    Parameters
    ----------
    policy : moerouter policy
        Routes ``(T, E)`` logits.
    """

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy
        self._losses: dict[str, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return int(self.policy.num_experts)

    def extra_repr(self) -> str:
        return repr(self.policy)

    def __repr__(self) -> str:  # results.json's "router": the policy, with what wraps it
        return f"{type(self).__name__}({self.policy!r})"

    def install(self, layer: MoE) -> None:
        """Become ``layer``'s router (the gate is kept: its logits are this policy's)."""
        layer.router = self

    def take_losses(self) -> dict[str, torch.Tensor]:
        """The losses of the last training forward (replacing the layer's own of the same
        name), and forget them: ``"adaptive"`` is already weighted."""
        losses, self._losses = self._losses, {}
        return losses

    def forward(self, logits: torch.Tensor) -> mr.Routing:
        routing = self.policy(logits)
        if self.training:
            self._losses = self.training_losses(routing, logits)
        return routing

    def training_losses(self, routing: mr.Routing, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def capture(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """What evaluation keeps besides the gate logits to re-route later (default: nothing)."""
        return None

    def route(self, logits: torch.Tensor, captured: torch.Tensor | None) -> mr.Routing:
        """The inference routing of ``logits`` (as in ``eval()`` mode)."""
        return self.policy(logits)

    def figures(self, logits: torch.Tensor, routing: mr.Routing) -> dict[str, Any]:
        """Policy-specific validation figures (default: none)."""
        return {}


class TopPRouter(AdaptiveRouter):
    """:class:`moerouter.TopP`; balance over the experts actually reached
    (:func:`moerouter.losses.routed_load_balancing`) plus the paper's dynamic loss."""

    def training_losses(self, routing: mr.Routing, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "load_balancing": mr.losses.routed_load_balancing(routing),
            "adaptive": DYNAMIC_WEIGHT * mr.losses.dynamic_loss(routing),
        }


class ReLURouter(AdaptiveRouter):
    """:class:`moerouter.ReLURouting` with ReMoE's L1 penalty, whose coefficient
    (:func:`moerouter.policies.update_l1_coefficient`, state in, state out, kept in a buffer)
    steers the share of zero gates to ``1 - target_k / E``."""

    coefficient: torch.Tensor

    def __init__(self, policy: Any, target_k: float) -> None:
        super().__init__(policy)
        if not 0 < target_k < policy.num_experts:
            raise ValueError(f"target_k must be in (0, {policy.num_experts}), got {target_k}")
        self.target_sparsity = 1.0 - target_k / policy.num_experts
        self.register_buffer("coefficient", torch.tensor(L1_START))

    def training_losses(self, routing: mr.Routing, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        state = mr.policies.ReLURoutingState(self.coefficient.clone())  # updated in place below
        loss = state.coefficient * mr.losses.relu_l1_loss(routing)
        updated = mr.policies.update_l1_coefficient(
            state,
            mr.losses.relu_sparsity(routing).detach(),
            target_sparsity=self.target_sparsity,
            multiplier=L1_MULTIPLIER,
        )
        self.coefficient.copy_(updated.coefficient)  # used from the next step on
        # Only the L1 term shapes the gates, as in ReMoE: the z-loss (logsumexp squared) pushes
        # every logit down, so it sparsifies too and fights the coefficient (measured: a layer
        # fell to 1.0 experts per token with the coefficient at 1e-6); a softmax balancing loss
        # on the gates likewise.
        zero = loss.new_zeros(())
        return {"load_balancing": zero, "z_loss": zero, "adaptive": loss}

    def figures(self, logits: torch.Tensor, routing: mr.Routing) -> dict[str, Any]:
        return {
            "l1_coefficient": float(self.coefficient),
            "cut_fraction": float(mr.losses.relu_cut_fraction(routing)),
        }


class CausalExpertChoiceRouter(AdaptiveRouter):
    """:class:`moerouter.CausalExpertChoice`: batch expert choice while training, the causal
    rule in ``eval()``.

    ``"threshold"``: each training batch folds its C-th scores into the running thresholds
    (:func:`moerouter.policies.update_thresholds`, kept in buffers). ``"predictor"``: a linear
    classifier of the layer's input, detached (its loss trains the predictor only), learns with
    :func:`moerouter.losses.causal_predictor_loss` whether a token is in an expert's top-C; it
    starts as a copy of the gate, so at first it ranks tokens as the router does.
    """

    thresholds: torch.Tensor
    updates: torch.Tensor
    group_size: torch.Tensor

    def __init__(self, policy: mr.CausalExpertChoice, dim: int) -> None:
        super().__init__(policy)
        self.mode = policy.mode
        self.register_buffer("thresholds", torch.full((policy.num_experts,), math.inf))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int32))
        # Tokens per training group: batch expert choice on validation uses the same C.
        self.register_buffer("group_size", torch.zeros((), dtype=torch.int64))
        self.predictor = nn.Linear(dim, policy.num_experts) if policy.mode == "predictor" else None
        self._input: torch.Tensor | None = None

    def install(self, layer: MoE) -> None:
        """Also copy the gate into the predictor and watch the layer's input."""
        super().install(layer)
        self.to(layer.gate.weight.device)
        if self.predictor is not None:
            with torch.no_grad():
                self.predictor.weight.copy_(layer.gate.weight)
                self.predictor.bias.zero_()

        def keep_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._input = args[0].reshape(-1, args[0].shape[-1]).detach()

        layer.register_forward_pre_hook(keep_input)

    def _predict(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.predictor is not None
        return self.predictor(tokens.detach())

    def forward(self, logits: torch.Tensor) -> mr.Routing:
        if self.training:
            routing = self.policy(logits, training=True)
            self.group_size.fill_(logits.shape[0])
            state = mr.policies.update_thresholds(
                mr.policies.ThresholdState(self.thresholds, self.updates),
                routing,
                momentum=THRESHOLD_MOMENTUM,
            )
            self.thresholds.copy_(state.thresholds)
            self.updates.copy_(state.updates)
            if self.predictor is not None and self._input is not None:
                bce = mr.losses.causal_predictor_loss(self._predict(self._input), routing)
                self._losses = {"adaptive": bce}
            return routing
        captured = None if self.predictor is None else self._predict(self._require_input())
        return self.route(logits, captured)

    def _require_input(self) -> torch.Tensor:
        if self._input is None:
            raise RuntimeError("the predictor needs the layer's input: call install(layer) first")
        return self._input

    def capture(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return None if self.predictor is None else self._predict(tokens)

    def route(self, logits: torch.Tensor, captured: torch.Tensor | None) -> mr.Routing:
        if self.mode == "threshold":
            return self.policy(logits, self.thresholds)
        return self.policy(logits, predictor_logits=captured)

    def figures(self, logits: torch.Tensor, routing: mr.Routing) -> dict[str, Any]:
        group = int(self.group_size)
        if group == 0:
            raise RuntimeError("causal expert choice was never trained: no group size, no C")
        return causal_agreement(self.policy, logits, routing, group)


def causal_agreement(
    policy: mr.CausalExpertChoice, logits: torch.Tensor, causal: mr.Routing, group_size: int
) -> dict[str, Any]:
    """How the causal routing of ``logits`` (T, E) compares with batch expert choice over
    consecutive groups of ``group_size`` tokens (the training groups' size, hence the same C).

    Returns ``agreement`` (share of token-expert cells decided alike), ``recall`` (share of batch
    expert choice's assignments the causal rule makes too), ``precision`` (share of the causal
    assignments batch expert choice makes too), ``capacity`` (C), ``realised_capacity`` (tokens
    per group each expert took, causally) and ``realised_capacity_vs_c`` (that over C). Tokens past
    the last whole group are left out of the comparison.
    """
    num_experts = policy.num_experts
    groups = logits.shape[0] // group_size
    if groups == 0:
        raise ValueError(
            f"{logits.shape[0]} validation tokens are fewer than one group of {group_size}"
        )
    used = groups * group_size
    batch = mr.policies.expert_choice_targets(
        policy(logits[:used].reshape(groups, group_size, num_experts), training=True)
    ).bool()
    ids = causal.expert_ids.reshape(causal.num_tokens, -1)[:used].long()
    taken = torch.zeros(used, num_experts + 1, dtype=torch.bool, device=ids.device)
    taken.scatter_(1, torch.where(ids >= 0, ids, num_experts), True)
    mine = taken[:, :num_experts]
    both = float((mine & batch).sum())
    capacity = policy.capacity(group_size)
    per_group = mine.sum(0).double() / groups
    return {
        "agreement": float((mine == batch).double().mean()),
        "recall": both / max(float(batch.sum()), 1.0),
        "precision": both / max(float(mine.sum()), 1.0),
        "capacity": capacity,
        "realised_capacity": [float(count) for count in per_group],
        "realised_capacity_vs_c": [float(count) / capacity for count in per_group],
        "compared_tokens": used,
    }
