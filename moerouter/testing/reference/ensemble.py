"""Float64 loop references for Branch-Train-Merge (:mod:`moerouter.methods.ensemble`):
the domain posterior, the ensemble likelihood, the prior's update and top-k, parameter averaging.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import _descending, _softmax_list

__all__ = [
    "reference_average_parameters",
    "reference_domain_posterior",
    "reference_ensemble_log_likelihood",
    "reference_top_k_prior",
    "reference_update_prior",
]


def reference_domain_posterior(
    log_likelihoods: Any, prior: Any, *, window: int | None = 1, first_position: str = "uniform"
) -> np.ndarray:
    """Posterior over experts at each position of one sequence (T, J), or a batch (B, T, J)."""
    values = to_numpy(log_likelihoods).astype(np.float32).astype(np.float64)
    pi = to_numpy(prior).astype(np.float32).astype(np.float64)
    if values.ndim == 3:
        priors = pi if pi.ndim == 2 else np.broadcast_to(pi, (values.shape[0], pi.shape[-1]))
        return np.stack(
            [
                reference_domain_posterior(
                    values[b], priors[b], window=window, first_position=first_position
                )
                for b in range(values.shape[0])
            ]
        )
    num_positions, num_experts = values.shape
    out = np.zeros((num_positions, num_experts))
    for t in range(num_positions):
        if t == 0 and first_position == "uniform":
            allowed = [j for j in range(num_experts) if pi[j] > 0]
            for j in allowed:
                out[t, j] = 1.0 / len(allowed)
            continue
        start = 0 if window is None else max(0, t - window)
        scores = []
        for j in range(num_experts):
            if pi[j] <= 0:
                scores.append(-math.inf)
                continue
            scores.append(math.log(pi[j]) + sum(values[s, j] for s in range(start, t)))
        out[t] = _softmax_list(scores)
    return out


def reference_ensemble_log_likelihood(log_likelihoods: Any, weights: Any) -> np.ndarray:
    """``log sum_j w_j p_j`` per position."""
    values = to_numpy(log_likelihoods).astype(np.float32).astype(np.float64)
    mix = np.broadcast_to(to_numpy(weights).astype(np.float32).astype(np.float64), values.shape)
    out = np.zeros(values.shape[:-1])
    for index in np.ndindex(*values.shape[:-1]):
        out[index] = math.log(
            sum(mix[index][j] * math.exp(values[index][j]) for j in range(values.shape[-1]))
        )
    return out


def reference_update_prior(prior: Any, posteriors: Any, *, alpha: float = 0.3) -> np.ndarray:
    """pandas ``ewm(alpha, adjust=False)`` over the rows, continuing from ``prior``."""
    rows = np.atleast_2d(to_numpy(posteriors).astype(np.float64))
    state = None if prior is None else to_numpy(prior).astype(np.float64)
    for row in rows:
        state = row.copy() if state is None else (1 - alpha) * state + alpha * row
    assert state is not None
    return state


def reference_top_k_prior(prior: Any, k: int) -> np.ndarray:
    values = to_numpy(prior).astype(np.float32).astype(np.float64)
    out = np.zeros_like(values)
    for index in np.ndindex(*values.shape[:-1]):
        row = values[index]
        keep = _descending(row.tolist())[:k]
        total = sum(row[j] for j in keep)
        for j in keep:
            out[index][j] = row[j] / total if total > 0 else 0.0
    return out


def reference_average_parameters(parameters: list[Any], weights: list[float]) -> Any:
    """Weighted average (weights normalised) of nests of dicts, lists and tuples."""
    total = float(sum(weights))
    first = parameters[0]
    if isinstance(first, dict):
        return {
            key: reference_average_parameters([p[key] for p in parameters], weights)
            for key in first
        }
    if isinstance(first, list | tuple):
        return [
            reference_average_parameters([p[i] for p in parameters], weights)
            for i in range(len(first))
        ]
    leaves = [to_numpy(p).astype(np.float64) for p in parameters]
    return sum(w / total * leaf for w, leaf in zip(weights, leaves, strict=True))
