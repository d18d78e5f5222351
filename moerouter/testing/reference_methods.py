"""Old path of references now in
:mod:`moerouter.testing.reference` (``methods``).

Kept, without a warning, for older branches and plugins: the names below are the very
objects of their new homes. New code imports from ``moerouter.testing.reference.<subject>``.
"""

# ruff: noqa: F401  (re-exports)
from moerouter.testing.reference.methods import (
    _argmax,
    _f,
    _i,
    _nll,
    _sigmoid,
    _softmax_row,
    reference_align_gradients,
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

__all__ = [
    "reference_align_gradients",
    "reference_binary_kl",
    "reference_binary_kl_norm",
    "reference_cross_entropy",
    "reference_dispersion",
    "reference_dual_head_loss",
    "reference_expert_collapse",
    "reference_expert_degradation",
    "reference_expert_normalization",
    "reference_expert_underfitting",
    "reference_feature_gate",
    "reference_hierarchy_mask",
    "reference_mix",
    "reference_mixed_logits_loss",
    "reference_mlp_confidence",
    "reference_multi_gate",
    "reference_power_confidence",
    "reference_predict",
    "reference_predict_mixed",
    "reference_self_gate",
    "reference_weighted_loss",
]
