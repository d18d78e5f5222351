"""Router policies: each turns router logits into a :class:`moerouter.Routing`.

Every policy is a frozen dataclass of its hyper-parameters, validated on creation, and a pure
function of the logits when called. One module per policy family, nothing else:

- :mod:`~moerouter.policies.topk`: :class:`TopK`, softmax or sigmoid token choice with capacity.
- :mod:`~moerouter.policies.null`: :class:`NullExperts`, AdaMoE's null-expert adaptive routing.
- :mod:`~moerouter.policies.expert_choice`: :class:`ExpertChoice`, experts pick their tokens.
- :mod:`~moerouter.policies.anchor`: :class:`AnchorRouting`, MEMoE's knowledge-anchor routing
  around any policy.
- :mod:`~moerouter.policies.locality`: :class:`LocalityTopK` and :class:`AffinityRouting`,
  LocMoE / LocMoE+ locality and affinity routing.
- :mod:`~moerouter.policies.sinkhorn`: :class:`SinkhornTokenChoice`, :class:`SinkhornExpertChoice`,
  selection from a balanced entropic transport plan (V-MoE routers study).
- :mod:`~moerouter.policies.balanced`: :class:`BalancedAssignment`, BASE layers' exactly balanced
  one-expert-per-token assignment.
- :mod:`~moerouter.policies.sparse_transport`: :class:`SparsityConstrainedExpertChoice`, expert
  choice from a k-sparse transport plan.
- :mod:`~moerouter.policies.soft_moe`: :class:`SoftMoE`, slots as weighted averages of tokens.
- :mod:`~moerouter.policies.deepseek`: :class:`DeepSeekTopK`, sigmoid scores, group-limited
  routing and the selection-only expert bias of auxiliary-loss-free balancing.
- :mod:`~moerouter.policies.gshard`: :class:`GShardTop2`, top-2 with a random second expert.
- :mod:`~moerouter.policies.hash`: :class:`HashRouter`, token id to fixed experts (hash layers).
- :mod:`~moerouter.policies.top_p`: :class:`TopP`, top-p (dynamic) routing.
- :mod:`~moerouter.policies.causal_expert_choice`: :class:`CausalExpertChoice`, expert choice
  with a causal inference rule (thresholds or a predictor).
- :mod:`~moerouter.policies.relu`: :class:`ReLURouting`, ReMoE's ReLU routing and its adaptive
  L1 coefficient.

Also exported here, as before, though they live elsewhere: the gates of :mod:`moerouter.gates`
(:func:`cosine_router_logits`, :class:`FrozenRandomRouter`, the noise functions, LocMoE's
:func:`grouped_average_pooling` and :func:`affinity_scores`), SMoE-Dropout's
:func:`k_schedule` and :func:`evaluate_at_k` (:mod:`moerouter.methods.smoe_dropout`) and
:func:`locality_loss` (:mod:`moerouter.losses`).
"""

from moerouter.gates import (
    FrozenRandomRouter,
    affinity_scores,
    cosine_router_logits,
    gaussian_noise,
    grouped_average_pooling,
    multiplicative_jitter,
    noisy_top_k_std,
    vmoe_logit_noise,
)
from moerouter.losses.locality import locality_loss
from moerouter.methods.smoe_dropout import evaluate_at_k, k_schedule
from moerouter.policies.anchor import AnchorRouting, anchor_mean_logits, anchor_router_input
from moerouter.policies.balanced import BalancedAssignment
from moerouter.policies.causal_expert_choice import (
    CausalExpertChoice,
    ThresholdState,
    expert_choice_targets,
    threshold_state_init,
    update_thresholds,
)
from moerouter.policies.deepseek import (
    DeepSeekTopK,
    ExpertBiasState,
    expert_bias_init,
    update_expert_bias,
)
from moerouter.policies.expert_choice import ExpertChoice
from moerouter.policies.gshard import GShardTop2
from moerouter.policies.hash import HashRouter, balanced_hash_table, random_hash_table
from moerouter.policies.locality import AffinityRouting, LocalityTopK
from moerouter.policies.null import NullExperts
from moerouter.policies.relu import (
    ReLURouting,
    ReLURoutingState,
    relu_state_init,
    update_l1_coefficient,
)
from moerouter.policies.sinkhorn import SinkhornExpertChoice, SinkhornTokenChoice, sinkhorn_plan
from moerouter.policies.soft_moe import SoftMoE
from moerouter.policies.sparse_transport import SparsityConstrainedExpertChoice
from moerouter.policies.top_p import TopP
from moerouter.policies.topk import TopK

__all__ = [
    "AffinityRouting",
    "AnchorRouting",
    "BalancedAssignment",
    "CausalExpertChoice",
    "DeepSeekTopK",
    "ExpertBiasState",
    "ExpertChoice",
    "FrozenRandomRouter",
    "GShardTop2",
    "HashRouter",
    "LocalityTopK",
    "NullExperts",
    "ReLURouting",
    "ReLURoutingState",
    "SinkhornExpertChoice",
    "SinkhornTokenChoice",
    "SoftMoE",
    "SparsityConstrainedExpertChoice",
    "ThresholdState",
    "TopK",
    "TopP",
    "affinity_scores",
    "anchor_mean_logits",
    "anchor_router_input",
    "balanced_hash_table",
    "cosine_router_logits",
    "evaluate_at_k",
    "expert_bias_init",
    "expert_choice_targets",
    "gaussian_noise",
    "grouped_average_pooling",
    "k_schedule",
    "locality_loss",
    "multiplicative_jitter",
    "noisy_top_k_std",
    "random_hash_table",
    "relu_state_init",
    "sinkhorn_plan",
    "threshold_state_init",
    "update_expert_bias",
    "update_l1_coefficient",
    "update_thresholds",
    "vmoe_logit_noise",
]


# The gate and schedule modules that lived here (policies.cosine, .noise, .smoe_dropout) stay
# reachable as attributes, through their deprecation aliases, only when asked for.
_MOVED_MODULES = ("cosine", "noise", "smoe_dropout")


def __getattr__(name: str) -> object:
    if name in _MOVED_MODULES:
        import importlib

        return importlib.import_module(f"moerouter.policies.{name}")
    raise AttributeError(f"module 'moerouter.policies' has no attribute {name!r}")
