"""Router noise and jitter with the randomness passed in: equal inputs, equal decisions anywhere.

Every function here takes the random draws as an array the caller made (standard normal or
uniform on [0, 1), of the logits' shape), so a routing is a pure function of its inputs and
NumPy, array-api-strict, PyTorch and JAX decide alike on the same draws. Draw them with your
framework's generator, e.g. ``torch.randn(logits.shape, generator=g)``,
``jax.random.normal(key, logits.shape)`` or ``np.random.default_rng(seed).standard_normal``.
Apply noise in training only; evaluate on clean logits.
"""

from __future__ import annotations

from array_api_compat import is_array_api_obj

from moerouter._agnostic.scores import softplus, to_float32
from moerouter._typing import Array
from moerouter._validation import check_real, check_same_shape, float_namespace

__all__ = ["gaussian_noise", "multiplicative_jitter", "noisy_top_k_std", "vmoe_logit_noise"]


def gaussian_noise(logits: Array, normal: Array, std: Array | float) -> Array:
    r"""``logits + normal * std`` in float32: Gaussian logit noise with a given scale.

    .. math:: \tilde\ell = \ell + \varepsilon \odot \sigma, \qquad \varepsilon \sim N(0, 1)

    Parameters
    ----------
    logits : array (..., E'), real floating
        Router logits.
    normal : array, shape of ``logits``
        Standard normal draws.
    std : float or array broadcastable to ``logits``
        Noise scale ``sigma`` (an array for Shazeer's learned scale, :func:`noisy_top_k_std`).

    Returns
    -------
    array, float32, shape of ``logits``
        The noisy logits :math:`\tilde\ell`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.gaussian_noise(xp.asarray([1.0, 2.0]), xp.asarray([1.0, -1.0]), 0.5)
    Array([1.5, 1.5], dtype=array_api_strict.float32)
    """
    if isinstance(std, int | float) and not isinstance(std, bool):
        xp = float_namespace(("logits", logits), ("normal", normal))
        check_real(std, "std", nonnegative=True)
        scale: Array = std
    else:
        xp = float_namespace(("logits", logits), ("normal", normal), ("std", std))
        scale = xp.astype(std, xp.float32)
    check_same_shape("normal", normal, logits, "logits")
    return to_float32(logits, xp=xp) + xp.astype(normal, xp.float32) * scale


def vmoe_logit_noise(logits: Array, normal: Array, *, noise_std: float = 1.0) -> Array:
    r"""V-MoE's router noise: Gaussian with standard deviation ``noise_std / E'``.

    .. math:: \tilde\ell = \ell + \varepsilon \, \frac{\sigma}{E'}, \qquad
        \varepsilon \sim N(0, 1)

    where :math:`E'` is the logits' last dimension (Riquelme et al. 2021, "Scaling Vision with
    Sparse Mixture of Experts"; ``google-research/vmoe`` ``NoisyTopExpertsPerItemRouter``,
    ``noise_std=1``; Tutel's ``gate_noise`` is the same rule). V-MoE then takes the softmax of
    the noisy logits *over all experts* and does not renormalise the top-k: use
    ``mr.TopK(E, k, normalize=False)(vmoe_logit_noise(logits, normal))``.

    Parameters
    ----------
    logits : array (..., E'), real floating
    normal : array, shape of ``logits``
        Standard normal draws.
    noise_std : float
        ``sigma`` >= 0.

    Returns
    -------
    array, float32, shape of ``logits``
        The noisy logits :math:`\tilde\ell`, for a top-k without renormalisation.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.vmoe_logit_noise(xp.zeros((1, 4)), xp.ones((1, 4)), noise_std=2.0)
    Array([[0.5, 0.5, 0.5, 0.5]], dtype=array_api_strict.float32)
    """
    noise_std = check_real(noise_std, "noise_std", nonnegative=True)
    if is_array_api_obj(logits) and logits.ndim < 1:
        raise ValueError("logits must have an expert axis (last dimension)")
    num_columns = int(logits.shape[-1]) if is_array_api_obj(logits) else 1
    return gaussian_noise(logits, normal, noise_std / num_columns)


def noisy_top_k_std(noise_logits: Array, *, noise_epsilon: float = 1e-2) -> Array:
    r"""Shazeer et al.'s learned noise scale: ``softplus(x W_noise) + noise_epsilon``.

    Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks";
    ``tensorflow/tensor2tensor`` ``expert_utils.noisy_top_k_gating``):

    .. math::

        \sigma(x) = \mathrm{softplus}(x W_{\mathrm{noise}}) + \epsilon, \qquad
        H(x) = x W_g + \varepsilon \odot \sigma(x), \qquad
        G(x) = \mathrm{softmax}(\mathrm{KeepTopK}(H(x), k)).

    The caller computes ``x W_noise`` with its own layer; this gives ``sigma`` for
    :func:`gaussian_noise`, and ``mr.TopK(E, k)`` on ``H`` is exactly ``G`` (a softmax over the
    k kept logits). Keep ``sigma`` and the clean logits for the load loss.

    Parameters
    ----------
    noise_logits : array (..., E), real floating
        ``x W_noise``.
    noise_epsilon : float
        ``epsilon`` >= 0 (1e-2 in tensor2tensor).

    Returns
    -------
    array, float32, shape of ``noise_logits``
        :math:`\sigma(x)`, the ``std`` of :func:`gaussian_noise`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.noisy_top_k_std(xp.asarray([0.0, -30.0]), noise_epsilon=0.01)  # log 2 + 0.01, ~0.01
    Array([0.7031472, 0.01     ], dtype=array_api_strict.float32)
    """
    noise_epsilon = check_real(noise_epsilon, "noise_epsilon", nonnegative=True)
    xp = float_namespace(("noise_logits", noise_logits))
    values = xp.astype(noise_logits, xp.float32)
    return softplus(values, xp=xp) + noise_epsilon


def multiplicative_jitter(values: Array, uniform: Array, *, epsilon: float = 1e-2) -> Array:
    r"""Switch Transformer's multiplicative jitter: ``values * U(1 - eps, 1 + eps)``.

    .. math:: \tilde v = v \odot (1 - \epsilon + 2 \epsilon u), \qquad u \sim U[0, 1)

    Switch (Fedus et al. 2021) multiplies the router *input* by this noise during training
    (Mesh TensorFlow ``router_jitter_noise``; Megatron-Core ``input_jitter_eps``); it works on
    any array, router inputs or logits.

    Parameters
    ----------
    values : array, real floating
    uniform : array, shape of ``values``
        Uniform draws on [0, 1).
    epsilon : float
        ``eps`` >= 0 (Switch: 1e-2).

    Returns
    -------
    array, float32, shape of ``values``
        The jittered values :math:`\tilde v`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.multiplicative_jitter(xp.asarray([2.0, 2.0]), xp.asarray([0.0, 0.5]), epsilon=0.25)
    Array([1.5, 2. ], dtype=array_api_strict.float32)
    """
    epsilon = check_real(epsilon, "epsilon", nonnegative=True)
    xp = float_namespace(("values", values), ("uniform", uniform))
    check_same_shape("uniform", uniform, values, "values")
    scale = (1.0 - epsilon) + (2.0 * epsilon) * xp.astype(uniform, xp.float32)
    return to_float32(values, xp=xp) * scale
