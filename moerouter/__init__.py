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
    GShardTop2,
    LocalityTopK,
    NullExperts,
    SinkhornExpertChoice,
    SinkhornTokenChoice,
    SoftMoE,
    SparsityConstrainedExpertChoice,
    TopK,
    gaussian_noise,
    multiplicative_jitter,
    noisy_top_k_std,
    update_expert_bias,
    vmoe_logit_noise,
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
    "GShardTop2",
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
    "gaussian_noise",
    "losses",
    "make_plan",
    "merging",
    "multiplicative_jitter",
    "multitask",
    "noisy_top_k_std",
    "policies",
    "stats",
    "update_expert_bias",
    "vmoe_logit_noise",
]
