"""Old path of references now in
:mod:`moerouter.testing.reference` (``adaptive``).

Kept, without a warning, for older branches and plugins: the names below are the very
objects of their new homes. New code imports from ``moerouter.testing.reference.<subject>``.
"""

# ruff: noqa: F401  (re-exports)
from moerouter.testing.reference.adaptive import (
    _token_routing,
    reference_causal_expert_choice,
    reference_relu_l1_loss,
    reference_relu_routing,
    reference_routed_load_balancing,
    reference_top_p,
)

__all__ = [
    "reference_causal_expert_choice",
    "reference_relu_l1_loss",
    "reference_relu_routing",
    "reference_routed_load_balancing",
    "reference_top_p",
]
