"""Old path of ``reference.losses``, ``reference.stats``: the same objects, no warning."""

from moerouter.testing.reference import _common, losses, stats
from moerouter.testing.reference._alias import forward_to

__all__ = (
    "reference_co_occurrence reference_concatenated_load_balancing reference_entropy "
    "reference_importance_loss reference_load_loss reference_normal_cdf "
    "reference_processed_by_at_least reference_sequence_load_balancing"
).split()
__getattr__ = forward_to(losses, stats, _common)
