"""The three kernels moerouter's public functions call for ``torch.Tensor`` inputs.

Each has the signature of the public function of the same name and returns exactly what the
agnostic path returns: identical integer plan fields, bit-identical dispatch, combine within
float32 rounding (and bit-identical run to run).
"""

from __future__ import annotations

import torch

from moerouter import Plan, Routing
from moerouter_torch import _ops

__all__ = ["combine", "dispatch", "make_plan"]


def make_plan(routing: Routing) -> Plan:
    """:func:`moerouter.make_plan` for torch: counting sort by expert, int32 throughout."""
    group_sizes, order, inverse, source_tokens, num_valid, combine_rows, combine_slots = (
        _ops.plan_indices(
            routing.token_ids,
            routing.expert_ids,
            routing.num_tokens,
            routing.num_experts,
            routing.fan_in,
            routing.layout == "token",
        )
    )
    # The weights are gathered here, outside the custom op, so autograd carries their gradient
    # back to the router logits.
    weights = routing.weights
    if routing.layout == "token":
        picked = weights.reshape(routing.num_tokens, routing.fan_in)
    else:
        picked = weights[combine_slots.clamp(min=0)]
    combine_weights = torch.where(combine_rows >= 0, picked, torch.zeros_like(picked))
    return Plan(
        group_sizes=group_sizes,
        order=order,
        inverse=inverse,
        source_tokens=source_tokens,
        num_valid=num_valid,
        combine_rows=combine_rows,
        combine_weights=combine_weights,
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
    )


def dispatch(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """:func:`moerouter.dispatch` for torch: one gather into a reused workspace on CPU."""
    return _ops.dispatch(x, plan.source_tokens, plan.num_valid, plan.combine_rows)


def combine(ye: torch.Tensor, plan: Plan) -> torch.Tensor:
    """:func:`moerouter.combine` for torch: token-major gather-reduce, float32 accumulation."""
    return _ops.combine(
        ye, plan.combine_rows, plan.combine_weights, plan.source_tokens, plan.num_valid
    )
