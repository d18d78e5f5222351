"""Old path of references now in ``moerouter.testing.reference``
(``token_choice``, ``gates``, ``plan``, ``capacity``): the same objects, no warning.
"""

from moerouter.testing.reference import _common, capacity, gates, plan, token_choice
from moerouter.testing.reference._alias import forward_to

__all__ = (
    "reference_cosine_router_logits reference_deepseek reference_gshard_top2 reference_hash "
    "reference_multiplicative_jitter reference_noisy_top_k_std reference_padded_plan "
    "reference_update_expert_bias reference_vmoe_logit_noise"
).split()
__getattr__ = forward_to(token_choice, gates, plan, capacity, _common)
