"""Float64 loop references for what produces or perturbs logits (:mod:`moerouter.gates`):
V-MoE logit noise, noisy top-k's noise scale, multiplicative jitter and cosine router logits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy

__all__ = [
    "reference_cosine_router_logits",
    "reference_multiplicative_jitter",
    "reference_noisy_top_k_std",
    "reference_vmoe_logit_noise",
]


def reference_vmoe_logit_noise(logits: Any, normal: Any, noise_std: float = 1.0) -> np.ndarray:
    """``logits + normal * noise_std / E'`` in float64."""
    values = to_numpy(logits).astype(np.float64)
    result: np.ndarray = values + to_numpy(normal).astype(np.float64) * (
        noise_std / values.shape[-1]
    )
    return result


def reference_noisy_top_k_std(noise_logits: Any, noise_epsilon: float = 1e-2) -> np.ndarray:
    """``softplus(noise_logits) + noise_epsilon`` in float64, entry by entry."""
    flat = to_numpy(noise_logits).astype(np.float64)
    out = np.array(
        [max(v, 0.0) + math.log1p(math.exp(-abs(v))) + noise_epsilon for v in flat.ravel()]
    )
    return out.reshape(flat.shape)


def reference_multiplicative_jitter(values: Any, uniform: Any, epsilon: float = 1e-2) -> np.ndarray:
    """``values * (1 - epsilon + 2 epsilon u)`` in float64."""
    v = to_numpy(values).astype(np.float64)
    u = to_numpy(uniform).astype(np.float64)
    result: np.ndarray = v * (1.0 - epsilon + 2.0 * epsilon * u)
    return result


def reference_cosine_router_logits(
    tokens: Any,
    expert_embeddings: Any,
    log_scale: Any,
    max_log_scale: float = math.log(100.0),
    eps: float = 1e-12,
) -> np.ndarray:
    """Cosine logits in float64, one (token, expert) pair at a time."""
    h = to_numpy(tokens).astype(np.float64)
    w = to_numpy(expert_embeddings).astype(np.float64)
    tau = float(np.asarray(to_numpy(log_scale) if not isinstance(log_scale, float) else log_scale))
    scale = math.exp(min(tau, max_log_scale))
    flat = h.reshape(-1, h.shape[-1])
    out = np.zeros((flat.shape[0], w.shape[1]))
    for t in range(flat.shape[0]):
        token_norm = max(math.sqrt(sum(v * v for v in flat[t])), eps)
        for e in range(w.shape[1]):
            column = w[:, e]
            expert_norm = max(math.sqrt(sum(v * v for v in column)), eps)
            dot = sum(a * b for a, b in zip(flat[t], column, strict=True))
            out[t, e] = scale * dot / (token_norm * expert_norm)
    return out.reshape(*h.shape[:-1], w.shape[1])
