"""Gates: what produces or perturbs router logits, before a policy routes them.

- :mod:`~moerouter.gates.cosine`: :func:`cosine_router_logits`, Tutel's cosine router.
- :mod:`~moerouter.gates.frozen_random`: :class:`FrozenRandomRouter`, SMoE-Dropout's frozen
  random linear router.
- :mod:`~moerouter.gates.locality`: :func:`grouped_average_pooling` and :func:`affinity_scores`,
  LocMoE's parameter-free gate and LocMoE+'s token-expert affinity.
- :mod:`~moerouter.gates.noise`: logit noise and jitter with caller-supplied random draws.

Every name is also exported from :mod:`moerouter.policies` and :mod:`moerouter`, as before.
"""

from moerouter.gates.cosine import cosine_router_logits
from moerouter.gates.frozen_random import FrozenRandomRouter
from moerouter.gates.locality import affinity_scores, grouped_average_pooling
from moerouter.gates.noise import (
    gaussian_noise,
    multiplicative_jitter,
    noisy_top_k_std,
    vmoe_logit_noise,
)

__all__ = [
    "FrozenRandomRouter",
    "affinity_scores",
    "cosine_router_logits",
    "gaussian_noise",
    "grouped_average_pooling",
    "multiplicative_jitter",
    "noisy_top_k_std",
    "vmoe_logit_noise",
]
