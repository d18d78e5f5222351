"""Old path of ``reference.methods``: the same objects, no warning."""

from moerouter.testing.reference import methods
from moerouter.testing.reference._alias import forward_to

__all__ = (
    "reference_align_gradients reference_binary_kl reference_binary_kl_norm "
    "reference_cross_entropy reference_dispersion reference_dual_head_loss "
    "reference_expert_collapse reference_expert_degradation reference_expert_normalization "
    "reference_expert_underfitting reference_feature_gate reference_hierarchy_mask "
    "reference_mix reference_mixed_logits_loss reference_mlp_confidence reference_multi_gate "
    "reference_power_confidence reference_predict reference_predict_mixed reference_self_gate "
    "reference_weighted_loss"
).split()
__getattr__ = forward_to(methods)
