"""The seed papers' methods that are not routing policies.

Each module implements one paper, on any array-API backend:

- :mod:`~moerouter.methods.multitask`: multi-gate mixtures of experts for multi-task learning.
- :mod:`~moerouter.methods.confidence`: confidence-weighted weak/strong expert mixing.
- :mod:`~moerouter.methods.ensemble`: Branch-Train-Merge ensembles routed by a domain posterior.
- :mod:`~moerouter.methods.merging`: MC-SMoE, merging experts guided by routing statistics.
- :mod:`~moerouter.methods.distillation`: router and expert distillation losses.
- :mod:`~moerouter.methods.smoe_dropout`: SMoE-Dropout's k schedule.

The first five are also ``mr.multitask``, ``mr.confidence``, ``mr.ensemble``, ``mr.merging`` and
``mr.distillation``, as before; the policies live in :mod:`moerouter.policies`.
"""

from moerouter.methods import (
    confidence,
    distillation,
    ensemble,
    merging,
    multitask,
    smoe_dropout,
)

__all__ = ["confidence", "distillation", "ensemble", "merging", "multitask", "smoe_dropout"]
