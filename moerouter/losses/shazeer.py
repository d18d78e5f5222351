"""Shazeer et al. 2017: the importance and load losses, and the normal CDF they need."""

from __future__ import annotations

import math
from typing import Any, Literal

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._agnostic.scores import finite_rows
from moerouter._arrays import device_of
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_positive_int,
    check_routing,
    flat_mask,
    valid_tokens,
)
from moerouter.losses._shared import (
    _cv_squared,
)
from moerouter.routing import Routing

__all__ = ["importance_loss", "load_loss"]


@fill_doc
def importance_loss(
    routing: Routing,
    *,
    source: Literal["weights", "probs"] = "weights",
    mask: Array | None = None,
) -> Array:
    r"""Importance loss: squared coefficient of variation of the per-expert importance.

    .. math::

        \mathrm{Importance}_e = \sum_t g_{t,e}, \qquad
        L_{\mathrm{imp}} = \mathrm{CV}(\mathrm{Importance})^2
        = \frac{\mathrm{Var}_e(\mathrm{Importance})}{\mathrm{Mean}_e(\mathrm{Importance})^2
        + 10^{-10}},

    with the population variance over experts (Shazeer et al., "Outrageously Large Neural
    Networks", ICLR 2017; tensor2tensor ``cv_squared``). 0 when every expert is equally important;
    :math:`E - 1` when one expert takes everything. The gate :math:`g` is

    - ``source="weights"`` (default; tensor2tensor ``NoisyTopKGating``): the combine weights,
      i.e. the gate after top-k (zero outside the chosen experts, and after capacity drops),
      over the :math:`E` real experts.
    - ``source="probs"`` (V-MoE ``_importance_auxiliary_loss``, Tutel ``load_importance_loss``):
      the full router probabilities :math:`p_{t,e}` over all :math:`E'` columns.

    V-MoE computes it per group and averages over groups; Tutel uses the unbiased variance
    (:math:`E - 1` in the denominator), which is :math:`E/(E-1)` times this value. With
    ``source="weights"`` the per-expert sum compares every assignment with every expert:
    memory :math:`O(T k E)` float32, ``k`` times the router probabilities.

    Parameters
    ----------
    %(routing)s
    source : {"weights", "probs"}
        Which gate values make the importance.
    %(mask)s

    Returns
    -------
    array ()
        float32 scalar, differentiable with respect to the gate values.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=2, k=1)(xp.asarray([[1.0, 0.0], [2.0, 0.0]]))
    >>> float(mr.losses.importance_loss(routing))  # all the importance on expert 0: E - 1
    1.0
    """
    routing = check_routing(routing)
    check_choice(source, "source", ("weights", "probs"))
    xp = array_namespace(routing.probs)
    valid = valid_tokens(routing, mask, xp)
    if source == "probs":
        probs = xp.where(valid[:, None], routing.probs, xp.zeros_like(routing.probs))
        importance = xp.sum(probs, axis=0)
    else:
        counted = xp.take(valid, routing.token_ids) & (routing.expert_ids >= 0)
        weights = xp.where(counted, routing.weights, xp.zeros_like(routing.weights))
        experts = xp.arange(routing.num_experts, dtype=xp.int32, device=device_of(routing.probs))
        one_hot = xp.astype(routing.expert_ids[:, None] == experts[None, :], xp.float32)
        importance = xp.sum(weights[:, None] * one_hot, axis=0)
    return _cv_squared(importance, xp)


def load_loss(
    logits: Array,
    noisy_logits: Array,
    noise_std: Array | float,
    *,
    k: int,
    threshold: Literal["shazeer", "vmoe"] = "shazeer",
    mask: Array | None = None,
    xp: Any = None,
) -> Array:
    r"""Shazeer's smooth load loss: CV² of the expected number of tokens per expert under noise.

    With clean logits :math:`\ell`, the noisy logits :math:`h = \ell + \sigma \cdot
    \mathcal{N}(0, 1)` the router selected its top-k from, and the standard normal CDF
    :math:`\Phi`:

    .. math::

        P(t, e) = \Phi\Bigl(\frac{\ell_{t,e} - \theta_{t,e}}{\sigma_{t,e}}\Bigr), \qquad
        \mathrm{Load}_e = \sum_t P(t, e), \qquad
        L_{\mathrm{load}} = \frac{\mathrm{Var}_e(\mathrm{Load})}{\mathrm{Mean}_e(\mathrm{Load})^2
        + 10^{-10}},

    :math:`P(t, e)` being the probability that expert :math:`e` stays in token :math:`t`'s top-k
    when only its own noise is drawn again. The threshold :math:`\theta` is

    - ``"shazeer"`` (default; Shazeer et al. 2017, tensor2tensor ``_prob_in_top_k``): the
      :math:`(k+1)`-th largest noisy logit of the token when :math:`h_{t,e}` is above it (the
      expert is in the top-k), else the :math:`k`-th largest. Needs :math:`k < E`.
    - ``"vmoe"`` (V-MoE ``_load_auxiliary_loss``; Tutel's ``load_importance_loss`` does the same
      on softmax scores): the :math:`k`-th largest noisy logit for every expert.

    Where :math:`\sigma_{t,e} = 0` the probability is the indicator :math:`\ell_{t,e} >
    \theta_{t,e}`; a :math:`-\infty` logit has probability 0, and a :math:`-\infty` threshold
    gives every finite logit probability 1.
    :math:`\Phi(x) = \frac{1}{2}\operatorname{erfc}(-x/\sqrt{2})`; the array API has no
    ``erf``, so ``erfc`` is the Chebyshev fit of Press et al. (*Numerical Recipes*, §6.2,
    ``erfcc``), fractional error below :math:`1.2 \cdot 10^{-7}` everywhere, evaluated in
    float32 (tests check it against :func:`math.erfc`).

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Clean router logits, real floating dtype.
    noisy_logits : array
        The noisy logits the router used, same shape.
    noise_std : array or float
        :math:`\sigma`: a number, a 0-d array, or an array of the logits' shape (Shazeer's
        per-(token, expert) ``softplus(x W_noise) + eps``; V-MoE's ``noise_std / E``).
    k : int
        Experts per token.
    threshold : {"shazeer", "vmoe"}
        How :math:`\theta` is chosen.
    mask : array (T,) or (G, S) bool, optional
        Valid (non-padding) tokens. Rows whose logits are not finite are left out too.
    xp : namespace, optional
        Inferred from the arrays when None.

    Returns
    -------
    array ()
        float32 scalar, differentiable with respect to the logits, the noisy logits and
        ``noise_std``.
        0 when no token is valid (zero tokens: see the module docstring).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[1.0, 0.0], [0.0, 1.0]])
    >>> float(mr.losses.load_loss(logits, logits, 1.0, k=1))  # symmetric: balanced
    0.0
    """
    if not is_array_api_obj(logits):
        raise TypeError(f"logits must be an array, got {type(logits).__name__}")
    if not is_array_api_obj(noisy_logits):
        raise TypeError(f"noisy_logits must be an array, got {type(noisy_logits).__name__}")
    arrays = [logits, noisy_logits] + ([noise_std] if is_array_api_obj(noise_std) else [])
    xp = array_namespace(*arrays) if xp is None else xp
    if logits.ndim not in (2, 3):
        raise ValueError(
            "logits must have shape (tokens, experts) or (groups, tokens, experts), "
            f"got shape {tuple(logits.shape)}"
        )
    if tuple(noisy_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"noisy_logits must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(noisy_logits.shape)}"
        )
    for name, value in (("logits", logits), ("noisy_logits", noisy_logits)):
        if not xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating dtype, got {value.dtype}")
    num_experts = int(logits.shape[-1])
    check_choice(threshold, "threshold", ("shazeer", "vmoe"))
    check_positive_int(k, "k")
    largest_k = num_experts - 1 if threshold == "shazeer" else num_experts
    if k > largest_k:
        raise ValueError(
            f"k must be <= {largest_k} for threshold={threshold!r} with {num_experts} experts, "
            f"got {k}"
        )
    std_array: Any = noise_std
    if is_array_api_obj(std_array):
        if tuple(std_array.shape) not in ((), tuple(logits.shape)):
            raise ValueError(
                f"noise_std must be a number, a 0-d array or an array of shape "
                f"{tuple(logits.shape)}, got shape {tuple(std_array.shape)}"
            )
        if not xp.isdtype(std_array.dtype, "real floating"):
            raise TypeError(f"noise_std must be a real floating dtype, got {std_array.dtype}")
        std = xp.astype(std_array, xp.float32)
    elif isinstance(noise_std, int | float) and not isinstance(noise_std, bool):
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        std = xp.asarray(float(noise_std), dtype=xp.float32, device=device_of(logits))
    else:
        raise TypeError(f"noise_std must be a number or an array, got {type(noise_std).__name__}")

    clean = xp.reshape(xp.astype(logits, xp.float32), (-1, num_experts))
    noisy = xp.reshape(xp.astype(noisy_logits, xp.float32), (-1, num_experts))
    std = xp.reshape(std, (-1, num_experts)) if std.ndim > 0 else std
    shapes = (tuple(logits.shape[:-1]), (int(clean.shape[0]),))
    flat = flat_mask(mask, shapes, xp)
    valid = finite_rows(clean, xp=xp) & finite_rows(noisy, xp=xp)
    valid = valid if flat is None else valid & flat
    clean = xp.where(valid[:, None], clean, xp.zeros_like(clean))
    noisy = xp.where(valid[:, None], noisy, xp.zeros_like(noisy))

    ranked = xp.sort(noisy, axis=-1, descending=True)
    kth = ranked[:, k - 1 : k]
    if threshold == "shazeer":
        next_one = ranked[:, k : k + 1]
        theta = xp.where(noisy > next_one, next_one, kth)
    else:
        theta = kth
    positive = std > 0
    safe_std = xp.where(positive, std, xp.ones_like(std))
    # A -inf logit is never selected (P = 0); a -inf threshold admits every finite logit
    # (P = 1). Both are set apart before subtracting so that no inf - inf NaN (or its
    # gradient) appears.
    never = clean == -xp.inf
    always = (theta == -xp.inf) & ~never
    finite_clean = xp.where(never, xp.zeros_like(clean), clean)
    finite_theta = xp.where(theta == -xp.inf, xp.zeros_like(theta), theta)
    gap = finite_clean - finite_theta
    smooth = _normal_cdf(gap / safe_std, xp=xp)
    hard = xp.astype(gap > 0, xp.float32)
    prob = xp.where(positive, smooth, hard)
    prob = xp.where(always, xp.ones_like(prob), prob)
    prob = xp.where(valid[:, None] & ~never, prob, xp.zeros_like(prob))
    return _cv_squared(xp.sum(prob, axis=0), xp)


# Numerical Recipes' erfcc Chebyshev coefficients, innermost last (fractional error < 1.2e-7).
_ERFC_COEFFICIENTS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


def _erfc(x: Array, *, xp: Any) -> Array:
    """Complementary error function in float32 (Press et al., Numerical Recipes §6.2)."""
    # where, not abs: at x == 0 the gradient must come from one side, not be zeroed by sign(0).
    z = xp.where(x >= 0, x, -x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = xp.full_like(z, _ERFC_COEFFICIENTS[-1])
    for coefficient in reversed(_ERFC_COEFFICIENTS[1:-1]):
        poly = coefficient + t * poly
    poly = _ERFC_COEFFICIENTS[0] + t * poly
    tail = t * xp.exp(-z * z + poly)
    return xp.where(x >= 0, tail, 2.0 - tail)


def _normal_cdf(x: Array, *, xp: Any) -> Array:
    r"""Standard normal CDF :math:`\Phi(x) = \frac{1}{2}\operatorname{erfc}(-x/\sqrt{2})`."""
    return 0.5 * _erfc(-x * (1.0 / math.sqrt(2.0)), xp=xp)
