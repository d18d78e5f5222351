"""Old path of ``reference.adaptive``, ``reference.capacity``: the same objects, no warning."""

from moerouter.testing.reference import _common, adaptive, capacity
from moerouter.testing.reference._alias import forward_to

__all__ = (
    "reference_causal_expert_choice reference_relu_l1_loss reference_relu_routing "
    "reference_routed_load_balancing reference_top_p"
).split()
__getattr__ = forward_to(adaptive, _common, capacity)
