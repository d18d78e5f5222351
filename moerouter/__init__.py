"""moerouter: Mixture-of-Experts routing written once, run on any array library.

A policy turns router logits into a :class:`Routing`; :func:`make_plan` turns that into a
:class:`Plan`; :func:`dispatch` and :func:`combine` move token rows to experts and back.
Nothing here imports a framework: the backend is chosen per call from the arrays' type.
"""

from moerouter import (
    confidence,
    distillation,
    ensemble,
    losses,
    merging,
    multitask,
    policies,
    stats,
)
from moerouter._registry import BackendInfo
from moerouter.policies import (
    AffinityRouting,
    AnchorRouting,
    BalancedAssignment,
    DeepSeekTopK,
    ExpertChoice,
    LocalityTopK,
    NullExperts,
    SinkhornExpertChoice,
    SinkhornTokenChoice,
    SoftMoE,
    SparsityConstrainedExpertChoice,
    TopK,
    update_expert_bias,
)
from moerouter.routing import Plan, Routing, SoftRouting, combine, dispatch, make_plan

__version__ = "0.1.0"

__all__ = [
    "AffinityRouting",
    "AnchorRouting",
    "BackendInfo",
    "BalancedAssignment",
    "DeepSeekTopK",
    "ExpertChoice",
    "LocalityTopK",
    "NullExperts",
    "Plan",
    "Routing",
    "SinkhornExpertChoice",
    "SinkhornTokenChoice",
    "SoftMoE",
    "SoftRouting",
    "SparsityConstrainedExpertChoice",
    "TopK",
    "__version__",
    "combine",
    "confidence",
    "dispatch",
    "distillation",
    "ensemble",
    "losses",
    "make_plan",
    "merging",
    "multitask",
    "policies",
    "stats",
    "update_expert_bias",
]
