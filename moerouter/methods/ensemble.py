r"""Branch-Train-Merge: ensembles of expert models routed by a domain posterior.

Li, Gururangan, Dettmers, Lewis, Althoff, Smith, Zettlemoyer, "Branch-Train-Merge: Embarrassingly
Parallel Training of Expert Language Models" (arXiv 2208.03306). Each expert is a whole model
(an ELM, one per domain); the "router" is a Bayesian posterior over domains, updated token by
token from each expert's likelihood of the text so far. Formulas follow the released code
(kernelmachine/demix ``fairseq/sequence_scorer.py``, hadasah/btm ``btm_utils/average.py``):

.. math::

    p(x_t \mid x_{<t}) = \sum_j w_{j,t}\, p_j(x_t \mid x_{<t}),
    \qquad
    w_{j,t} = \frac{\pi_j \prod_{s \in \mathcal{W}_t} p_j(x_s \mid x_{<s})}
                   {\sum_{j'} \pi_{j'} \prod_{s \in \mathcal{W}_t} p_{j'}(x_s \mid x_{<s})}

with :math:`\mathcal{W}_t` the last ``window`` positions before ``t`` (the code uses window 1,
the previous token only; the paper's :math:`P(x_{<t} \mid D=j)` is the whole prefix,
``window=None``; which one the paper's numbers use is UNVERIFIED). The prior :math:`\pi` is an
exponential moving average of per-sequence posteriors over held-out data (pandas
``ewm(alpha=0.3, adjust=False)``), optionally cut to its top-k entries and renormalised.

Parameter averaging (:func:`average_parameters`) and branching a new expert from the nearest
existing ones (:func:`branch_parameters`) work on any nest of dicts, lists and tuples of arrays
(a PyTorch ``state_dict``, a JAX/Flax params pytree, NumPy arrays). The weighting used to
initialise a new branch from several experts is UNVERIFIED (the abstract says "branching from
(mixtures of) ELMs"; the weights here are the new domain's posterior over the top experts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace

from moerouter._agnostic.scores import log_softmax
from moerouter._agnostic.select import top_k
from moerouter._arrays import check_concrete, device_of
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import check_choice, check_floating, check_positive_int, is_array

__all__ = [
    "average_parameters",
    "branch_parameters",
    "domain_posterior",
    "ensemble_log_likelihood",
    "top_k_prior",
    "update_prior",
]


@fill_doc
def domain_posterior(
    log_likelihoods: Array,
    prior: Array,
    *,
    window: int | None = 1,
    first_position: str = "uniform",
    xp: Any = None,
) -> Array:
    r"""Posterior over the ``J`` experts at every position, from their past likelihoods.

    :math:`w_{j,t} \propto \pi_j \exp\big(\sum_{s=\max(0,t-W)}^{t-1} \log p_j(x_s)\big)` for
    :math:`t \ge 1` (the module docstring has the formula); computed as a softmax in log space.

    Parameters
    ----------
    log_likelihoods : array (..., T, J)
        ``log p_j(x_t | x_<t)``: each expert's log-probability of the token actually at position
        ``t`` (gather your models' log-softmax at the labels).
    prior : array (J,) or (..., J)
        Domain prior, non-negative; zeros exclude an expert (see :func:`top_k_prior`).
    window : int or None
        How many previous tokens the likelihood covers: 1 reproduces the released code,
        None the whole prefix (DEMix/BTM paper form, UNVERIFIED as the paper's exact choice).
    first_position : {"uniform", "prior"}
        The weights at ``t = 0``, where nothing has been seen: "uniform" over the experts the
        prior allows (the released code; uniform over all experts for a full prior), or the prior.
    %(xp)s

    Returns
    -------
    array (..., T, J) float32
        Rows sum to 1; ``w[..., t, :]`` weighs the experts' predictions of token ``t``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> log_p = xp.log(xp.asarray([[0.5, 0.1], [0.2, 0.2], [0.9, 0.3]]))   # (T=3, J=2)
    >>> w = mr.ensemble.domain_posterior(log_p, xp.asarray([0.5, 0.5]))
    >>> [round(float(v), 4) for v in w[1, :]]                             # 0.5 : 0.1 after token 0
    [0.8333, 0.1667]
    """
    log_likelihoods = check_floating(log_likelihoods, "log_likelihoods", min_ndim=2)
    prior = check_floating(prior, "prior", min_ndim=1)
    xp = array_namespace(log_likelihoods, prior) if xp is None else xp
    check_choice(first_position, "first_position", ("uniform", "prior"))
    num_experts = log_likelihoods.shape[-1]
    if prior.shape[-1] != num_experts:
        raise ValueError(
            f"prior has {prior.shape[-1]} experts, log_likelihoods {num_experts} (last axis)"
        )
    if window is not None:
        check_positive_int(window, "window")
    values = xp.astype(log_likelihoods, xp.float32)
    num_positions = values.shape[-2]
    prior = xp.astype(prior, xp.float32)
    allowed = prior > 0
    log_prior = xp.where(allowed, xp.log(xp.where(allowed, prior, 1.0)), -xp.inf)[..., None, :]
    # evidence[t] = sum of log-likelihoods of positions [t - W, t - 1]: static slices, so the
    # window sum has a fixed order (no cumulative-sum differences) and traces under jit.
    zero_row = xp.zeros_like(values[..., :1, :])
    shifted = xp.concat([zero_row, values[..., :-1, :]], axis=-2)  # shifted[t] = value[t - 1]
    if window is None:
        evidence = xp.cumulative_sum(shifted, axis=-2)
    else:
        evidence = shifted
        for lag in range(1, min(window, num_positions)):
            pad = xp.concat(
                [
                    xp.zeros_like(values[..., : lag + 1, :]),
                    values[..., : num_positions - lag - 1, :],
                ],
                axis=-2,
            )
            evidence = evidence + pad
    posterior = xp.exp(log_softmax(log_prior + evidence, xp=xp))
    if first_position == "uniform":
        count = xp.sum(xp.astype(allowed, xp.float32), axis=-1, keepdims=True)
        start = xp.astype(allowed, xp.float32) / count
        start = xp.broadcast_to(start[..., None, :], posterior[..., :1, :].shape)
        posterior = xp.concat([start, posterior[..., 1:, :]], axis=-2)
    return posterior


@fill_doc
def ensemble_log_likelihood(log_likelihoods: Array, weights: Array, *, xp: Any = None) -> Array:
    r"""Log-likelihood of the ensemble: :math:`\log \sum_j w_{j,t}\, p_j(x_t \mid x_{<t})`.

    Parameters
    ----------
    log_likelihoods : array (..., T, J)
        As in :func:`domain_posterior`.
    weights : array (..., T, J) or (J,)
        Mixture weights, e.g. :func:`domain_posterior` or a fixed prior.
    %(xp)s

    Returns
    -------
    array (..., T) float32
        Per-token log-likelihood (negate and average for the ensemble's cross-entropy).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> log_p = xp.log(xp.asarray([[0.5, 0.1]]))
    >>> log_mix = mr.ensemble.ensemble_log_likelihood(log_p, xp.asarray([0.5, 0.5]))
    >>> round(float(xp.exp(log_mix)[0]), 6)
    0.3
    """
    log_likelihoods = check_floating(log_likelihoods, "log_likelihoods", min_ndim=1)
    weights = check_floating(weights, "weights", min_ndim=1)
    xp = array_namespace(log_likelihoods, weights) if xp is None else xp
    if weights.shape[-1] != log_likelihoods.shape[-1]:
        raise ValueError(
            f"weights have {weights.shape[-1]} experts, log_likelihoods {log_likelihoods.shape[-1]}"
        )
    weights = xp.astype(weights, xp.float32)
    positive = weights > 0
    log_weights = xp.where(positive, xp.log(xp.where(positive, weights, 1.0)), -xp.inf)
    terms = log_weights + xp.astype(log_likelihoods, xp.float32)
    peak = xp.max(terms, axis=-1, keepdims=True)
    peak = xp.where(peak > -xp.inf, peak, xp.zeros_like(peak))
    return xp.log(xp.sum(xp.exp(terms - peak), axis=-1)) + peak[..., 0]


@fill_doc
def update_prior(
    prior: Array | None, posteriors: Array, *, alpha: float = 0.3, xp: Any = None
) -> Array:
    r"""Fold sequence posteriors into the domain prior: an EMA, as pandas ``ewm(adjust=False)``.

    :math:`\pi \leftarrow (1 - \alpha)\,\pi + \alpha\, w_b` for each sequence ``b`` in order; with
    ``prior=None`` the first posterior starts the average (pandas' first value). BTM's
    ``updating_prior`` feeds the posterior at each held-out sequence's last position
    (``domain_posterior(...)[..., -1, :]``) with ``alpha = 0.3``; its ``cached_prior`` runs this
    over at most 100 held-out sequences and then keeps the prior fixed.

    Parameters
    ----------
    prior : array (J,) or None
        The current prior (the state); None before any data.
    posteriors : array (B, J) or (J,)
        Posteriors of ``B`` sequences, in the order they arrive.
    alpha : float
        Smoothing, ``0 < alpha <= 1``.
    %(xp)s

    Returns
    -------
    array (J,) float32
        The new prior (a pure function: ``prior`` is not modified).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> prior = mr.ensemble.update_prior(None, xp.asarray([[1.0, 0.0], [0.0, 1.0]]), alpha=0.5)
    >>> prior
    Array([0.5, 0.5], dtype=array_api_strict.float32)
    """
    posteriors = check_floating(posteriors, "posteriors", min_ndim=1)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    arrays = [posteriors] if prior is None else [posteriors, prior]
    xp = array_namespace(*arrays) if xp is None else xp
    rows = xp.astype(posteriors, xp.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2:
        raise ValueError(f"posteriors must have shape (B, J) or (J,), got {posteriors.shape}")
    if prior is not None:
        prior = check_floating(prior, "prior", min_ndim=1)
        if tuple(prior.shape) != (rows.shape[1],):
            raise ValueError(f"prior must have shape ({rows.shape[1]},), got {prior.shape}")
        state = xp.astype(prior, xp.float32)
        start = 0
    else:
        state = rows[0, :]
        start = 1
    for b in range(start, rows.shape[0]):
        state = (1.0 - alpha) * state + alpha * rows[b, :]
    return state


def top_k_prior(prior: Array, k: int, *, xp: Any = None) -> Array:
    """Keep the ``k`` largest prior entries (ties to the lower index), zero the rest, renormalise.

    BTM's ``--eval-topk``: only the top-k experts of the prior run at test time.

    Parameters
    ----------
    prior : array (..., J)
        Non-negative prior.
    k : int
        ``1 <= k <= J``.
    xp : namespace, optional
        Inferred from ``prior``.

    Returns
    -------
    array (..., J) float32

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.ensemble.top_k_prior(xp.asarray([0.1, 0.6, 0.3]), 2)
    Array([0.        , 0.6666667 , 0.33333334], dtype=array_api_strict.float32)
    """
    prior = check_floating(prior, "prior", min_ndim=1)
    xp = array_namespace(prior) if xp is None else xp
    check_positive_int(k, "k")
    num_experts = prior.shape[-1]
    if k > num_experts:
        raise ValueError(f"k must be <= J = {num_experts}, got {k}")
    values = xp.astype(prior, xp.float32)
    chosen = top_k(values, k, xp=xp)
    columns = xp.arange(num_experts, dtype=chosen.dtype, device=device_of(values))
    keep = xp.any(chosen[..., :, None] == columns, axis=-2)
    kept = xp.where(keep, values, xp.zeros_like(values))
    total = xp.sum(kept, axis=-1, keepdims=True)
    return kept / xp.where(total > 0, total, xp.ones_like(total))


def _mix_weights(weights: Any, count: int, name: str, function: str) -> list[float]:
    """Concrete non-negative mixing weights, normalised to sum 1 (read on the host)."""
    if is_array(weights):
        check_concrete(weights, name, function)
        if weights.ndim != 1:
            raise ValueError(f"weights must be one-dimensional, got shape {weights.shape}")
        values = [float(weights[j]) for j in range(weights.shape[0])]
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        values = [float(w) for w in weights]
    else:
        raise TypeError(f"weights must be a sequence of numbers or a 1-D array, got {weights!r}")
    if len(values) != count:
        raise ValueError(f"weights has {len(values)} entries for {count} parameter sets")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"weights must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return [v / total for v in values]


def _average_leaves(leaves: list[Any], weights: list[float], path: str) -> Any:
    first = leaves[0]
    if not is_array(first):
        raise TypeError(f"parameter {path} is a {type(first).__name__}, not an array")
    xp = array_namespace(*leaves)
    for leaf in leaves[1:]:
        if tuple(leaf.shape) != tuple(first.shape):
            raise ValueError(f"parameter {path} has shapes {tuple(first.shape)} and {leaf.shape}")
    if not xp.isdtype(first.dtype, "real floating"):
        raise TypeError(f"parameter {path} has dtype {first.dtype}; only floats can be averaged")
    # Accumulate in at least float32 (bfloat16/float16 parameters would lose the small weights).
    wide = first.dtype if xp.isdtype(first.dtype, xp.float64) else xp.float32
    total = None
    for weight, leaf in zip(weights, leaves, strict=True):
        if weight == 0:
            continue
        term = xp.astype(leaf, wide) * weight
        total = term if total is None else total + term
    return xp.astype(total, first.dtype)


def _tree_average(trees: list[Any], weights: list[float], path: str) -> Any:
    first = trees[0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for tree in trees[1:]:
            if not isinstance(tree, Mapping) or set(tree.keys()) != set(keys):
                raise ValueError(f"parameters at {path or 'the root'} have different keys")
        averaged = {
            key: _tree_average([t[key] for t in trees], weights, f"{path}[{key!r}]") for key in keys
        }
        return averaged if type(first) is dict else type(first)(averaged)  # type: ignore[call-arg]
    if isinstance(first, list | tuple):
        for tree in trees[1:]:
            if not isinstance(tree, list | tuple) or len(tree) != len(first):
                raise ValueError(f"parameters at {path or 'the root'} have different lengths")
        items = [
            _tree_average([t[i] for t in trees], weights, f"{path}[{i}]") for i in range(len(first))
        ]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # NamedTuple
            return type(first)(*items)
        return type(first)(items)
    return _average_leaves(trees, weights, path or "at the root")


def average_parameters(parameters: Sequence[Any], weights: Any = None) -> Any:
    r"""Weighted average of several models' parameters: :math:`\theta = \sum_j w_j \theta_j`.

    BTM's ``average.py`` (collapse an ensemble of ELMs into one model). Weights are normalised
    to sum to 1 (uniform when omitted). Works leaf by leaf on any nest of dicts (including
    ``OrderedDict`` state dicts), lists, tuples and named tuples whose leaves are float arrays of
    any one backend; every model must have the same structure and shapes. Leaves are accumulated
    in float32 (float64 stays float64) and returned in their own dtype. Offline: the weights are
    read as Python numbers, so this does not run under ``jax.jit``.

    Parameters
    ----------
    parameters : sequence of pytrees
        ``J`` models' parameters.
    weights : sequence of float or 1-D array, optional
        Non-negative, not all zero; uniform when None.

    Returns
    -------
    pytree
        Same structure as ``parameters[0]``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> a = {"w": xp.asarray([0.0, 2.0]), "layers": [xp.asarray([1.0])]}
    >>> b = {"w": xp.asarray([4.0, 2.0]), "layers": [xp.asarray([3.0])]}
    >>> mr.ensemble.average_parameters([a, b], [3.0, 1.0])["w"]
    Array([1., 2.], dtype=array_api_strict.float64)
    """
    if isinstance(parameters, Mapping) or not isinstance(parameters, Sequence) or not parameters:
        raise TypeError("parameters must be a non-empty sequence of parameter trees")
    trees = list(parameters)
    mix = (
        [1.0 / len(trees)] * len(trees)
        if weights is None
        else _mix_weights(weights, len(trees), "weights", "average_parameters")
    )
    return _tree_average(trees, mix, "")


def branch_parameters(
    parameters: Sequence[Any], posterior: Any, *, k: int | None = None
) -> tuple[Any, list[int], list[float]]:
    """Initialise a new expert from the experts nearest its domain: BTM's branching step.

    The ``k`` experts with the largest posterior (ties to the lower index) are averaged with
    their posterior weights renormalised. The posterior is the new domain's, e.g.
    :func:`update_prior` over its held-out data. UNVERIFIED: the exact weighting and ``k`` the
    paper uses for branching from a mixture of ELMs (the abstract only says "branching from
    (mixtures of) ELMs"; the released code copies one seed checkpoint).

    Parameters
    ----------
    parameters : sequence of pytrees
        The ``J`` existing experts' parameters.
    posterior : sequence of float or 1-D array (J,)
        Relevance of each expert to the new domain; non-negative.
    k : int, optional
        How many experts to average; default all with a nonzero posterior.

    Returns
    -------
    parameters : pytree
        The initialisation of the new expert.
    chosen : list of int
        The experts averaged, best first.
    weights : list of float
        Their weights, summing to 1.

    Examples
    --------
    >>> import numpy as np
    >>> import moerouter as mr
    >>> experts = [{"w": np.array([0.0])}, {"w": np.array([1.0])}, {"w": np.array([4.0])}]
    >>> params, chosen, weights = mr.ensemble.branch_parameters(experts, [0.1, 0.3, 0.6], k=2)
    >>> chosen, [round(w, 4) for w in weights], params["w"]
    ([2, 1], [0.6667, 0.3333], array([3.]))
    """
    if isinstance(parameters, Mapping) or not isinstance(parameters, Sequence) or not parameters:
        raise TypeError("parameters must be a non-empty sequence of parameter trees")
    relevance = _mix_weights(posterior, len(parameters), "posterior", "branch_parameters")
    if k is None:
        k = sum(1 for value in relevance if value > 0)
    check_positive_int(k, "k")
    if k > len(parameters):
        raise ValueError(f"k must be <= the number of experts {len(parameters)}, got {k}")
    order = sorted(range(len(relevance)), key=lambda j: (-relevance[j], j))[:k]
    chosen_weights = _mix_weights(
        [relevance[j] for j in order], k, "posterior", "branch_parameters"
    )
    averaged = average_parameters([parameters[j] for j in order], chosen_weights)
    return averaged, order, chosen_weights
