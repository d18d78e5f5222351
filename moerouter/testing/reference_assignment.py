"""Old path of references now in
:mod:`moerouter.testing.reference` (``soft``, ``transport``).

Kept, without a warning, for older branches and plugins: the names below are the very
objects of their new homes. New code imports from ``moerouter.testing.reference.<subject>``.
"""

# ruff: noqa: F401  (re-exports)
from moerouter.testing.reference.soft import (
    reference_soft_combine,
    reference_soft_dispatch,
    reference_soft_moe,
)
from moerouter.testing.reference.transport import (
    _grouped,
    _lse,
    _noisy_and_clean,
    _potentials,
    _probs,
    _routable,
    _softmax,
    _sparse_simplex,
    reference_balanced_assignment,
    reference_sinkhorn_expert_choice,
    reference_sinkhorn_plan,
    reference_sinkhorn_token_choice,
    reference_sparse_transport_plan,
    reference_sparsity_constrained_expert_choice,
)

__all__ = [
    "reference_balanced_assignment",
    "reference_sinkhorn_expert_choice",
    "reference_sinkhorn_plan",
    "reference_sinkhorn_token_choice",
    "reference_soft_combine",
    "reference_soft_dispatch",
    "reference_soft_moe",
    "reference_sparse_transport_plan",
    "reference_sparsity_constrained_expert_choice",
]
