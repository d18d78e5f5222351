"""Cosine router logits: normalised tokens against normalised expert embeddings (Tutel)."""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace, device, is_array_api_obj

from moerouter._typing import Array

__all__ = ["cosine_router_logits"]


MAX_LOG_SCALE = math.log(1.0 / 0.01)


def cosine_router_logits(
    tokens: Array,
    expert_embeddings: Array,
    log_scale: Array | float,
    *,
    max_log_scale: float = MAX_LOG_SCALE,
    eps: float = 1e-12,
) -> Array:
    r"""Cosine-similarity router logits with a learnable temperature, for any policy.

    .. math::

        \ell_{t,e} = \exp\big(\min(\tau, \tau_{\max})\big) \,
            \frac{h_t}{\max(\lVert h_t \rVert, \epsilon)} \cdot
            \frac{w_e}{\max(\lVert w_e \rVert, \epsilon)}

    as Tutel's ``CosineTopKGate`` (``microsoft/tutel`` ``tutel/gates/cosine_top.py``; the
    SwinV2-MoE router of Liu et al., "Swin Transformer V2", 2022): :math:`h_t` are the token
    features after the caller's projection (Tutel: a ``Linear(model_dim, proj_dim=256)``),
    :math:`w_e` the columns of a learnable ``(proj_dim, E)`` matrix (Tutel initialises it
    :math:`N(0, 0.01^2)`), and :math:`\tau` a learnable log-scale (Tutel initialises it to
    :math:`\log(1/0.5)`, i.e. scale 2). The scale is clamped from above at
    :math:`\tau_{\max} = \log(1/0.01)` (a scale of at most 100), as Tutel does, and not from
    below; above the clamp :math:`\tau` gets no gradient (as with ``torch.clamp``). The
    normalisation matches ``torch.nn.functional.normalize`` (:math:`\epsilon = 10^{-12}`).
    Computed in float32; gradients flow to all three inputs. Feed the logits to any policy,
    e.g. ``mr.TopK(E, 1)`` (Tutel's ``cosine_top`` gate is softmax top-k on them).

    Parameters
    ----------
    tokens : array (..., p), real floating
        Projected token features ``h``.
    expert_embeddings : array (p, E), real floating
        Expert embeddings ``w``, one column per expert.
    log_scale : float or array of shape () or (1,)
        ``tau``, the learnable log of the logit scale.
    max_log_scale : float
        ``tau_max``.
    eps : float
        Smallest norm divided by.

    Returns
    -------
    array (..., E), float32

    Examples
    --------
    >>> import math
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> h = xp.asarray([[3.0, 4.0]])
    >>> w = xp.asarray([[1.0, 0.0], [0.0, 2.0]])
    >>> mr.cosine_router_logits(h, w, math.log(2.0))
    Array([[1.2, 1.6]], dtype=array_api_strict.float32)
    """
    for name, value in (("tokens", tokens), ("expert_embeddings", expert_embeddings)):
        if not is_array_api_obj(value):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    tau_input: Any = log_scale
    scale_is_array = is_array_api_obj(tau_input)
    arrays = (
        (tokens, expert_embeddings, tau_input) if scale_is_array else (tokens, expert_embeddings)
    )
    try:
        xp = array_namespace(*arrays)
    except TypeError as error:
        raise TypeError(
            "tokens, expert_embeddings and log_scale must be arrays of one backend"
        ) from error
    for name, value in (("tokens", tokens), ("expert_embeddings", expert_embeddings)):
        if not xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    if expert_embeddings.ndim != 2:
        raise ValueError(
            "expert_embeddings must have shape (features, experts), "
            f"got shape {tuple(expert_embeddings.shape)}"
        )
    if tokens.ndim < 1 or tokens.shape[-1] != expert_embeddings.shape[0]:
        raise ValueError(
            f"tokens have {tokens.shape[-1] if tokens.ndim else 0} features but "
            f"expert_embeddings has {expert_embeddings.shape[0]} rows"
        )
    for name, number in (("max_log_scale", max_log_scale), ("eps", eps)):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise TypeError(f"{name} must be a number, got {type(number).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    h = xp.astype(tokens, xp.float32)
    w = xp.astype(expert_embeddings, xp.float32)
    smallest = xp.asarray(eps, dtype=xp.float32, device=device(h))
    h = h / xp.maximum(xp.linalg.vector_norm(h, axis=-1, keepdims=True), smallest)
    w = w / xp.maximum(xp.linalg.vector_norm(w, axis=0, keepdims=True), smallest)
    if scale_is_array:
        if math.prod(tau_input.shape) != 1:
            raise ValueError(f"log_scale must hold one value, got shape {tuple(tau_input.shape)}")
        if not xp.isdtype(tau_input.dtype, "real floating"):
            raise TypeError(f"log_scale must be a real floating dtype, got {tau_input.dtype}")
        tau = xp.reshape(xp.astype(tau_input, xp.float32), ())
        ceiling = xp.asarray(max_log_scale, dtype=xp.float32, device=device(h))
        scale = xp.exp(xp.minimum(tau, ceiling))
    else:
        if isinstance(log_scale, bool) or not isinstance(log_scale, int | float):
            raise TypeError(
                f"log_scale must be a number or an array, got {type(log_scale).__name__}"
            )
        scale = math.exp(min(float(log_scale), float(max_log_scale)))
    return xp.matmul(h, w) * scale
