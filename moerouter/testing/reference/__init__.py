"""Float64 loop references for every policy, the plan, dispatch, combine, losses, stats and methods.

Each function here is written from the public contract (DESIGN.md and the docstrings of the
policies, :mod:`moerouter.losses`, :mod:`moerouter.stats` and :mod:`moerouter.methods`), one token
or one expert at a time in plain Python and NumPy float64, and shares no code with
:mod:`moerouter._agnostic`. They are slow and obvious on purpose: a backend kernel that agrees with
them agrees with the contract. One module per subject:

``token_choice`` (top-k, null experts, DeepSeek, GShard, hash), ``expert_choice``, ``adaptive``
(top-p, ReLU routing, causal expert choice), ``transport`` (Sinkhorn, balanced assignment,
sparsity-constrained), ``soft`` (Soft MoE), ``locality`` (LocMoE), ``gates`` (noise, cosine
logits), ``plan`` (make_plan, dispatch, combine), ``capacity``, ``losses``, ``stats``,
``methods`` (confidence, distillation, multitask, MEMoE), ``ensemble`` (BTM), ``merging``
(MC-SMoE) and ``edge_cases``. Every name is also importable from this package.

Conventions shared by all of them:

* Inputs may be NumPy arrays or arrays of any backend (they are copied to NumPy first); a routing
  or plan may be a :class:`moerouter.Routing` / :class:`moerouter.Plan` or a dict returned here.
* Logits are first rounded to float32, as every policy does, and selection ranks those float32
  values (ties go to the lower index). Probabilities, weights and losses are then computed in
  float64 from them.
* Decisions that compare probabilities of *different* tokens (expert choice, ``drop_policy=
  "probs"``) rank the float64 probabilities: they agree with a float32 backend whenever no two
  such probabilities are within float32 rounding of each other, and always for tokens whose logits
  rows are identical (DESIGN.md, "Expert choice ranks tokens ...").
* Returned dicts hold NumPy arrays: int32 indices, bool masks, float64 values.

The private helpers the single ``reference.py`` module used to define (``_routing``,
``_softmax``, ...) are re-exported here for older branches; new code imports them from
``moerouter.testing.reference._common``.
"""

from __future__ import annotations

# ruff: noqa: F401  (the private helpers of the old reference.py, re-exported for older branches)
from moerouter.testing.reference._common import (
    PLAN_ARRAYS,
    ROUTING_ARRAYS,
    ROUTING_STATICS,
    _descending,
    _grouped_float32,
    _plan,
    _ranked_columns,
    _routing,
    _row_is_finite,
    _sigmoid,
    _softmax,
    as_dict,
)
from moerouter.testing.reference.adaptive import (
    reference_causal_expert_choice,
    reference_relu_l1_loss,
    reference_relu_routing,
    reference_routed_load_balancing,
    reference_top_p,
)
from moerouter.testing.reference.capacity import (
    drop_over_capacity,
    reference_capacity,
)
from moerouter.testing.reference.edge_cases import (
    edge_case_logits,
)
from moerouter.testing.reference.ensemble import (
    reference_average_parameters,
    reference_domain_posterior,
    reference_ensemble_log_likelihood,
    reference_top_k_prior,
    reference_update_prior,
)
from moerouter.testing.reference.expert_choice import (
    _expert_layout,
    reference_expert_choice,
)
from moerouter.testing.reference.gates import (
    reference_cosine_router_logits,
    reference_multiplicative_jitter,
    reference_noisy_top_k_std,
    reference_vmoe_logit_noise,
)
from moerouter.testing.reference.locality import (
    reference_affinity_routing,
    reference_affinity_scores,
    reference_grouped_average_pooling,
    reference_locality_loss,
    reference_locality_topk,
)
from moerouter.testing.reference.losses import (
    _balance,
    _counted_pairs,
    _flat_mask,
    _normalised_row,
    reference_concatenated_load_balancing,
    reference_entropy,
    reference_importance_loss,
    reference_load_balancing,
    reference_load_loss,
    reference_normal_cdf,
    reference_null_load_balancing,
    reference_sequence_load_balancing,
    reference_z_loss,
)
from moerouter.testing.reference.merging import (
    reference_expert_similarity,
    reference_group_experts,
    reference_merge_experts,
    reference_remap_expert_ids,
    reference_routing_statistics,
)
from moerouter.testing.reference.methods import (
    reference_align_gradients,
    reference_anchor_mean_logits,
    reference_binary_kl,
    reference_binary_kl_norm,
    reference_cross_entropy,
    reference_dispersion,
    reference_dual_head_loss,
    reference_expert_collapse,
    reference_expert_degradation,
    reference_expert_normalization,
    reference_expert_underfitting,
    reference_feature_gate,
    reference_hierarchy_mask,
    reference_mix,
    reference_mixed_logits_loss,
    reference_mlp_confidence,
    reference_multi_gate,
    reference_power_confidence,
    reference_predict,
    reference_predict_mixed,
    reference_self_gate,
    reference_weighted_loss,
)
from moerouter.testing.reference.plan import (
    reference_combine,
    reference_dispatch,
    reference_make_plan,
    reference_padded_plan,
)
from moerouter.testing.reference.soft import (
    reference_soft_combine,
    reference_soft_dispatch,
    reference_soft_moe,
)
from moerouter.testing.reference.stats import (
    reference_co_occurrence,
    reference_processed_by_at_least,
    reference_summary,
)
from moerouter.testing.reference.token_choice import (
    _softmax_of_routed,
    _token_choice,
    reference_deepseek,
    reference_gshard_top2,
    reference_hash,
    reference_null_experts,
    reference_topk,
    reference_update_expert_bias,
)
from moerouter.testing.reference.transport import (
    reference_balanced_assignment,
    reference_sinkhorn_expert_choice,
    reference_sinkhorn_plan,
    reference_sinkhorn_token_choice,
    reference_sparse_transport_plan,
    reference_sparsity_constrained_expert_choice,
)

__all__ = [
    "as_dict",
    "drop_over_capacity",
    "edge_case_logits",
    "reference_affinity_routing",
    "reference_affinity_scores",
    "reference_align_gradients",
    "reference_anchor_mean_logits",
    "reference_average_parameters",
    "reference_balanced_assignment",
    "reference_binary_kl",
    "reference_binary_kl_norm",
    "reference_capacity",
    "reference_causal_expert_choice",
    "reference_co_occurrence",
    "reference_combine",
    "reference_concatenated_load_balancing",
    "reference_cosine_router_logits",
    "reference_cross_entropy",
    "reference_deepseek",
    "reference_dispatch",
    "reference_dispersion",
    "reference_domain_posterior",
    "reference_dual_head_loss",
    "reference_ensemble_log_likelihood",
    "reference_entropy",
    "reference_expert_choice",
    "reference_expert_collapse",
    "reference_expert_degradation",
    "reference_expert_normalization",
    "reference_expert_similarity",
    "reference_expert_underfitting",
    "reference_feature_gate",
    "reference_group_experts",
    "reference_grouped_average_pooling",
    "reference_gshard_top2",
    "reference_hash",
    "reference_hierarchy_mask",
    "reference_importance_loss",
    "reference_load_balancing",
    "reference_load_loss",
    "reference_locality_loss",
    "reference_locality_topk",
    "reference_make_plan",
    "reference_merge_experts",
    "reference_mix",
    "reference_mixed_logits_loss",
    "reference_mlp_confidence",
    "reference_multi_gate",
    "reference_multiplicative_jitter",
    "reference_noisy_top_k_std",
    "reference_normal_cdf",
    "reference_null_experts",
    "reference_null_load_balancing",
    "reference_padded_plan",
    "reference_power_confidence",
    "reference_predict",
    "reference_predict_mixed",
    "reference_processed_by_at_least",
    "reference_relu_l1_loss",
    "reference_relu_routing",
    "reference_remap_expert_ids",
    "reference_routed_load_balancing",
    "reference_routing_statistics",
    "reference_self_gate",
    "reference_sequence_load_balancing",
    "reference_sinkhorn_expert_choice",
    "reference_sinkhorn_plan",
    "reference_sinkhorn_token_choice",
    "reference_soft_combine",
    "reference_soft_dispatch",
    "reference_soft_moe",
    "reference_sparse_transport_plan",
    "reference_sparsity_constrained_expert_choice",
    "reference_summary",
    "reference_top_k_prior",
    "reference_top_p",
    "reference_topk",
    "reference_update_expert_bias",
    "reference_update_prior",
    "reference_vmoe_logit_noise",
    "reference_weighted_loss",
    "reference_z_loss",
]
