"""Old path of references now in ``moerouter.testing.reference``
(``transport``, ``soft``, ``capacity``, ``expert_choice``): the same objects, no warning.
"""

from moerouter.testing.reference import _common, capacity, expert_choice, soft, transport
from moerouter.testing.reference._alias import forward_to

__all__ = (
    "reference_balanced_assignment reference_sinkhorn_expert_choice reference_sinkhorn_plan "
    "reference_sinkhorn_token_choice reference_soft_combine reference_soft_dispatch "
    "reference_soft_moe reference_sparse_transport_plan "
    "reference_sparsity_constrained_expert_choice"
).split()
__getattr__ = forward_to(transport, soft, _common, capacity, expert_choice)
