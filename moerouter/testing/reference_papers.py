"""Old path of references now in
:mod:`moerouter.testing.reference` (``ensemble``, ``locality``, ``merging``, ``methods``).

Kept, without a warning, for older branches and plugins: the names below are the very
objects of their new homes. New code imports from ``moerouter.testing.reference.<subject>``.
"""

# ruff: noqa: F401  (re-exports)
from moerouter.testing.reference._common import (
    _descending,
    _row_is_finite,
    _softmax_list,
)
from moerouter.testing.reference.ensemble import (
    reference_average_parameters,
    reference_domain_posterior,
    reference_ensemble_log_likelihood,
    reference_top_k_prior,
    reference_update_prior,
)
from moerouter.testing.reference.locality import (
    _routing_dict,
    reference_affinity_routing,
    reference_affinity_scores,
    reference_grouped_average_pooling,
    reference_locality_loss,
    reference_locality_topk,
)
from moerouter.testing.reference.merging import (
    reference_expert_similarity,
    reference_group_experts,
    reference_merge_experts,
    reference_remap_expert_ids,
    reference_routing_statistics,
)
from moerouter.testing.reference.methods import (
    reference_anchor_mean_logits,
)

__all__ = [
    "reference_affinity_routing",
    "reference_affinity_scores",
    "reference_anchor_mean_logits",
    "reference_average_parameters",
    "reference_domain_posterior",
    "reference_ensemble_log_likelihood",
    "reference_expert_similarity",
    "reference_group_experts",
    "reference_grouped_average_pooling",
    "reference_locality_loss",
    "reference_locality_topk",
    "reference_merge_experts",
    "reference_remap_expert_ids",
    "reference_routing_statistics",
    "reference_top_k_prior",
    "reference_update_prior",
]
