"""Old path of references now in
:mod:`moerouter.testing.reference` (``capacity``, ``gates``, ``plan``, ``token_choice``).

Kept, without a warning, for older branches and plugins: the names below are the very
objects of their new homes. New code imports from ``moerouter.testing.reference.<subject>``.
"""

# ruff: noqa: F401  (re-exports)
from moerouter.testing.reference.capacity import (
    _apply_capacity,
)
from moerouter.testing.reference.gates import (
    reference_cosine_router_logits,
    reference_multiplicative_jitter,
    reference_noisy_top_k_std,
    reference_vmoe_logit_noise,
)
from moerouter.testing.reference.plan import (
    reference_padded_plan,
)
from moerouter.testing.reference.token_choice import (
    _eligible_columns,
    _group_scores,
    _pick,
    _selection,
    _token_routing,
    reference_deepseek,
    reference_gshard_top2,
    reference_hash,
    reference_update_expert_bias,
)

__all__ = [
    "reference_cosine_router_logits",
    "reference_deepseek",
    "reference_gshard_top2",
    "reference_hash",
    "reference_multiplicative_jitter",
    "reference_noisy_top_k_std",
    "reference_padded_plan",
    "reference_update_expert_bias",
    "reference_vmoe_logit_noise",
]
