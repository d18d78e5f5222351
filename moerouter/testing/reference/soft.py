"""Float64 loop references for Soft MoE (:class:`moerouter.SoftMoE`): the dispatch and combine
weights and the slot-wise dispatch and combine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference.transport import _grouped, _routable, _softmax

__all__ = ["reference_soft_combine", "reference_soft_dispatch", "reference_soft_moe"]


def reference_soft_moe(logits: Any, num_experts: int, slots_per_expert: int) -> dict[str, Any]:
    """What :class:`moerouter.SoftMoE` must return: per-slot and per-token softmaxes in float64."""
    raw = to_numpy(logits)
    values = _grouped(logits)
    if values.shape[-1] != num_experts * slots_per_expert:
        raise ValueError("logits must have num_experts * slots_per_expert columns")
    num_groups, group_size, num_slots = values.shape
    finite, pairs = _routable(values)
    dispatch = np.zeros(values.shape)
    combine = np.zeros(values.shape)
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s].astype(np.float64).tolist()
            combine[g, s] = _softmax(row, pairs[g, s].tolist())
        for n in range(num_slots):
            column = values[g, :, n].astype(np.float64).tolist()
            dispatch[g, :, n] = _softmax(column, pairs[g, :, n].tolist())
    return {
        "dispatch_weights": dispatch.reshape(raw.shape),
        "combine_weights": combine.reshape(raw.shape),
        "finite_rows": finite.reshape(-1),
    }


def reference_soft_dispatch(x: Any, dispatch_weights: Any) -> np.ndarray:
    """Slot ``n`` of each group is ``sum_s D[s, n] * x[s]``, float64 loops."""
    features, weights = (
        to_numpy(x).astype(np.float64),
        to_numpy(dispatch_weights).astype(np.float64),
    )
    grouped = features.ndim == 3
    if not grouped:
        features, weights = features[None], weights[None]
    num_groups, group_size, num_slots = weights.shape
    out = np.zeros((num_groups, num_slots, features.shape[-1]))
    for g in range(num_groups):
        for n in range(num_slots):
            for s in range(group_size):
                out[g, n] += weights[g, s, n] * features[g, s]
    return out if grouped else out[0]


def reference_soft_combine(ye: Any, combine_weights: Any) -> np.ndarray:
    """Token ``s`` of each group is ``sum_n W[s, n] * ye[n]``, float64 loops."""
    outputs = to_numpy(ye).astype(np.float64)
    weights = to_numpy(combine_weights).astype(np.float64)
    grouped = outputs.ndim == 3
    if not grouped:
        outputs, weights = outputs[None], weights[None]
    num_groups, group_size, num_slots = weights.shape
    out = np.zeros((num_groups, group_size, outputs.shape[-1]))
    for g in range(num_groups):
        for s in range(group_size):
            for n in range(num_slots):
                out[g, s] += weights[g, s, n] * outputs[g, n]
    return out if grouped else out[0]
