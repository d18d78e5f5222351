"""Deprecated import path: SMoE-Dropout's pieces moved to :mod:`moerouter.gates.frozen_random`
(:class:`FrozenRandomRouter`) and :mod:`moerouter.methods.smoe_dropout` (:func:`k_schedule`,
:func:`evaluate_at_k`).

Their names stay in :mod:`moerouter.policies` and :mod:`moerouter` (no warning); importing this
module still works, with a :class:`DeprecationWarning`.
"""

import warnings

from moerouter.gates.frozen_random import FrozenRandomRouter
from moerouter.methods.smoe_dropout import K_SCHEDULES, evaluate_at_k, k_schedule

__all__ = ["K_SCHEDULES", "FrozenRandomRouter", "evaluate_at_k", "k_schedule"]

warnings.warn(
    "moerouter.policies.smoe_dropout moved to moerouter.gates.frozen_random (FrozenRandomRouter) "
    "and moerouter.methods.smoe_dropout (k_schedule, evaluate_at_k); import them from there",
    DeprecationWarning,
    stacklevel=2,
)
