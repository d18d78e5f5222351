"""Old path of references now in ``moerouter.testing.reference``
(``ensemble``, ``merging``, ``locality``, ``methods``): the same objects, no warning.
"""

from moerouter.testing.reference import _common, ensemble, locality, merging, methods
from moerouter.testing.reference._alias import forward_to

__all__ = (
    "reference_affinity_routing reference_affinity_scores reference_anchor_mean_logits "
    "reference_average_parameters reference_domain_posterior reference_ensemble_log_likelihood "
    "reference_expert_similarity reference_group_experts reference_grouped_average_pooling "
    "reference_locality_loss reference_locality_topk reference_merge_experts "
    "reference_remap_expert_ids reference_routing_statistics reference_top_k_prior "
    "reference_update_prior"
).split()
__getattr__ = forward_to(ensemble, merging, locality, methods, _common)
