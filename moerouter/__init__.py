"""moerouter: Mixture-of-Experts routing written once, run on any array library.

A policy turns router logits into a :class:`Routing`; :func:`make_plan` turns that into a
:class:`Plan`; :func:`dispatch` and :func:`combine` move token rows to experts and back.
Nothing here imports a framework: the backend is chosen per call from the arrays' type.
"""

from moerouter import (
    gates,
    losses,
    methods,
    policies,
    simulate,
    stats,
    traces,
    workloads,
)
from moerouter._registry import BackendInfo, KernelSet
from moerouter.methods import confidence, distillation, ensemble, merging, multitask
from moerouter.policies import (
    AffinityRouting,
    AnchorRouting,
    BalancedAssignment,
    DeepSeekTopK,
    ExpertChoice,
    FrozenRandomRouter,
    GShardTop2,
    HashRouter,
    LocalityTopK,
    NullExperts,
    SinkhornExpertChoice,
    SinkhornTokenChoice,
    SoftMoE,
    SparsityConstrainedExpertChoice,
    TopK,
    balanced_hash_table,
    cosine_router_logits,
    evaluate_at_k,
    gaussian_noise,
    k_schedule,
    multiplicative_jitter,
    noisy_top_k_std,
    random_hash_table,
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
    "FrozenRandomRouter",
    "GShardTop2",
    "HashRouter",
    "KernelSet",
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
    "balanced_hash_table",
    "combine",
    "confidence",
    "cosine_router_logits",
    "dispatch",
    "distillation",
    "ensemble",
    "evaluate_at_k",
    "gates",
    "gaussian_noise",
    "k_schedule",
    "losses",
    "make_plan",
    "merging",
    "methods",
    "multiplicative_jitter",
    "multitask",
    "noisy_top_k_std",
    "policies",
    "random_hash_table",
    "simulate",
    "stats",
    "traces",
    "update_expert_bias",
    "vmoe_logit_noise",
    "workloads",
]
