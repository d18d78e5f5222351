"""The compared runs: one entry each in :data:`RUNS`.

A run says how a layer of the pretrained top-2 model is changed before fine-tuning
(``fine_tune``, in place) and which router a model trained from scratch uses (``scratch``,
``--from-scratch``). Another policy is one more entry, e.g. a threshold router::

    RunSpec("top-p", "top-p 0.5", _route_with(lambda: mr.TopP(EXPERTS, p=0.5)),
            lambda: mr.TopP(EXPERTS, p=0.5))

(the policy must be causal: a token's route may not depend on later tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import moerouter as mr
from moerouter_torch.nn import MoE

__all__ = ["BASELINE", "EXPERTS", "RUNS", "RunSpec"]

EXPERTS = 8  # real experts per MoE layer
BASELINE = "top2"  # the pretrained policy; every difference is taken against it


@dataclass(frozen=True)
class RunSpec:
    """One compared run (see the module docstring)."""

    name: str
    label: str
    fine_tune: Callable[[MoE], Any]
    scratch: Callable[[], Any]


def _route_with(make_router: Callable[[], Any]) -> Callable[[MoE], None]:
    """Keep the trained gate, route with another policy over the same ``E`` columns."""

    def convert(layer: MoE) -> None:
        layer.router = make_router()

    return convert


def _keep(layer: MoE) -> None:
    """Continue as trained."""


RUNS: dict[str, RunSpec] = {
    spec.name: spec
    for spec in (
        RunSpec("top2", "top-2 of 8", _keep, lambda: mr.TopK(EXPERTS, k=2)),
        # Fine-tuned: k set to 1 (the weight renormalises to 1). From scratch, Switch's raw
        # probability as the weight: a weight of exactly 1 would give the gate no task gradient.
        RunSpec(
            "top1",
            "top-1 of 8",
            _route_with(lambda: mr.TopK(EXPERTS, k=1)),
            lambda: mr.TopK(EXPERTS, k=1, normalize=False),
        ),
        RunSpec(
            "adamoe-8",
            "AdaMoE 8 + 8 null, k'=4",
            lambda layer: layer.to_adamoe(num_null=8, k=4),
            lambda: mr.NullExperts(EXPERTS, num_null=8, k=4),
        ),
        RunSpec(
            "adamoe-16",
            "AdaMoE 8 + 16 null, k'=4",
            lambda layer: layer.to_adamoe(num_null=16, k=4),
            lambda: mr.NullExperts(EXPERTS, num_null=16, k=4),
        ),
    )
}
