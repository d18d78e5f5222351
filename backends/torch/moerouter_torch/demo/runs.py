"""The compared runs: one entry each in :data:`RUNS`.

A run says how a layer of the pretrained top-2 model is changed before fine-tuning
(``fine_tune``, in place) and which router a model trained from scratch uses (``scratch``,
``--from-scratch``; it gets the layer after construction, as ``fine_tune`` does). Another policy
is one more entry (it must be causal: a token's route may not depend on later tokens).

Every peer of AdaMoE keeps the pretrained gate: its ``E`` logits are the new policy's logits.
Top-p and ReLU routing are set to about 1.5 real experts per token (top-p by ``p``, ReLU by its
adaptive L1 target), causal expert choice by its capacity factor 1.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

import moerouter as mr
from moerouter_torch.demo.adaptive import (
    CausalExpertChoiceRouter,
    ReLURouter,
    TopPRouter,
)
from moerouter_torch.nn import MoE

__all__ = ["BASELINE", "EXPERTS", "PEERS", "RUNS", "RunSpec"]

EXPERTS = 8  # real experts per MoE layer
BASELINE = "top2"  # the pretrained policy; every difference is taken against it
ADAPTIVE_K = 1.5  # the peers' target real experts per token
# Chosen on seed 0's pretrained checkpoint and fine-tune for ~1.5 real experts per token:
TOP_P = 0.22  # 0.3 gave 1.7-1.8 at conversion
# ReLU's L1 target: the coefficient's lag overshoots (target 1.5 ended at 1.3 experts per token)
RELU_TARGET_K = 1.75


@dataclass(frozen=True)
class RunSpec:
    """One compared run (see the module docstring)."""

    name: str
    label: str
    fine_tune: Callable[[MoE], Any]
    scratch: Callable[[], Any]
    # From scratch, after the layer is built around scratch(): e.g. install an adaptive router.
    scratch_layer: Callable[[MoE], Any] | None = None


def _route_with(make_router: Callable[[], Any]) -> Callable[[MoE], None]:
    """Keep the trained gate, route with another policy over the same ``E`` columns."""

    def convert(layer: MoE) -> None:
        layer.router = make_router()

    return convert


def _keep(layer: MoE) -> None:
    """Continue as trained."""


def _top_p() -> TopPRouter:
    # Renormalised weights, as the top-2 checkpoint was trained (the paper's raw probabilities
    # would scale every expert output down at conversion).
    return TopPRouter(mr.TopP(EXPERTS, p=TOP_P, max_k=EXPERTS, normalize=True))


def _relu(layer: MoE) -> None:
    # Centred gate rows: the same softmax (and top-2) as trained, but about half the experts of
    # a token positive, where the raw rows gave fewer than one, most gates dead at zero
    # (no gradient); the adaptive L1 penalty then prunes to the target.
    with torch.no_grad():
        layer.gate.weight -= layer.gate.weight.mean(0, keepdim=True)
    ReLURouter(mr.ReLURouting(EXPERTS, max_k=EXPERTS), target_k=RELU_TARGET_K).install(layer)


def _causal(mode: Literal["threshold", "predictor"]) -> Callable[[MoE], None]:
    def convert(layer: MoE) -> None:
        policy = mr.CausalExpertChoice(EXPERTS, capacity_factor=ADAPTIVE_K, mode=mode)
        CausalExpertChoiceRouter(policy, dim=layer.gate.in_features).install(layer)

    return convert


def _install(make_router: Callable[[], Any]) -> Callable[[MoE], None]:
    def convert(layer: MoE) -> None:
        make_router().install(layer)

    return convert


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
        RunSpec(
            "top-p",
            f"top-p {TOP_P}",
            _install(_top_p),
            lambda: mr.TopK(EXPERTS, k=2),
            _install(_top_p),
        ),
        RunSpec(
            "relu",
            f"ReLU routing, target {RELU_TARGET_K}",
            _relu,
            lambda: mr.TopK(EXPERTS, k=2),
            _relu,
        ),
        RunSpec(
            "causal-ec-threshold",
            f"causal EC threshold, cf {ADAPTIVE_K}",
            _causal("threshold"),
            lambda: mr.TopK(EXPERTS, k=2),
            _causal("threshold"),
        ),
        RunSpec(
            "causal-ec-predictor",
            f"causal EC predictor, cf {ADAPTIVE_K}",
            _causal("predictor"),
            lambda: mr.TopK(EXPERTS, k=2),
            _causal("predictor"),
        ),
    )
}

# AdaMoE's adaptive-compute peers (``--peers``): off by default, they double the run's time.
PEERS = ("top-p", "relu", "causal-ec-threshold", "causal-ec-predictor")
