"""Old path of references now in
:mod:`moerouter.testing.reference` (``losses``, ``stats``).

Kept, without a warning, for older branches and plugins: the names below are the very
objects of their new homes. New code imports from ``moerouter.testing.reference.<subject>``.
"""

# ruff: noqa: F401  (re-exports)
from moerouter.testing.reference.losses import (
    _cv_squared,
    _valid,
    reference_concatenated_load_balancing,
    reference_entropy,
    reference_importance_loss,
    reference_load_loss,
    reference_normal_cdf,
    reference_sequence_load_balancing,
)
from moerouter.testing.reference.stats import (
    _experts_of_tokens,
    reference_co_occurrence,
    reference_processed_by_at_least,
)

__all__ = [
    "reference_co_occurrence",
    "reference_concatenated_load_balancing",
    "reference_entropy",
    "reference_importance_loss",
    "reference_load_loss",
    "reference_normal_cdf",
    "reference_processed_by_at_least",
    "reference_sequence_load_balancing",
]
