"""Branch-Train-Merge (moerouter.ensemble) on every backend against the float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import Backend, assert_close, to_numpy
from moerouter.testing.reference.ensemble import (
    reference_average_parameters,
    reference_domain_posterior,
    reference_ensemble_log_likelihood,
    reference_top_k_prior,
    reference_update_prior,
)


def log_likelihoods(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.log(rng.uniform(0.01, 1.0, size=shape)).astype(np.float32)


POSTERIOR_CASES = [
    # The released DEMix/BTM scorer: previous token only, uniform first position.
    pytest.param(1, "uniform", [0.2, 0.5, 0.3], id="window1-uniform"),
    # A window of three previous tokens: exercises the shifted-sum path.
    pytest.param(3, "uniform", [0.2, 0.5, 0.3], id="window3"),
    # A window longer than the sequence equals the whole prefix.
    pytest.param(50, "prior", [0.2, 0.5, 0.3], id="window-longer-than-T"),
    # The paper's cumulative prefix likelihood.
    pytest.param(None, "prior", [0.2, 0.5, 0.3], id="full-prefix"),
    # A top-k prior with a zero: that expert gets weight 0 everywhere, the uniform start too.
    pytest.param(1, "uniform", [0.0, 0.7, 0.3], id="zero-prior"),
]


@pytest.mark.parametrize(("window", "first", "prior"), POSTERIOR_CASES)
def test_domain_posterior(backend, window, first, prior):
    values = log_likelihoods((2, 9, 3))
    prior = np.asarray(prior, np.float32)
    got = mr.ensemble.domain_posterior(
        backend.asarray(values), backend.asarray(prior), window=window, first_position=first
    )
    want = reference_domain_posterior(values, prior, window=window, first_position=first)
    assert_close(got, want, "posterior", rtol=1e-5, atol=1e-6)
    # Invariant: every position's weights are a distribution.
    assert_close(np.sum(to_numpy(got), axis=-1), np.ones((2, 9)), "row sums", rtol=1e-6)


def test_domain_posterior_one_token(backend):
    # T = 1: only the first position exists; no window slice may go negative.
    values = log_likelihoods((1, 4))
    got = mr.ensemble.domain_posterior(backend.asarray(values), backend.asarray(np.ones(4) / 4))
    assert_close(got, np.full((1, 4), 0.25), "posterior")


def test_ensemble_log_likelihood(backend):
    values = log_likelihoods((2, 5, 3), seed=1)
    weights = reference_domain_posterior(values, np.array([0.2, 0.5, 0.3]))
    got = mr.ensemble.ensemble_log_likelihood(
        backend.asarray(values), backend.asarray(weights.astype(np.float32))
    )
    assert_close(got, reference_ensemble_log_likelihood(values, weights), "log p", rtol=1e-5)


@pytest.mark.parametrize(
    "start",
    [
        # No prior yet: the first posterior starts the average (pandas adjust=False).
        pytest.param(None, id="from-first"),
        # Continue from a cached prior.
        pytest.param([0.5, 0.25, 0.25], id="from-prior"),
    ],
)
def test_update_prior(backend, start):
    rng = np.random.default_rng(2)
    posteriors = rng.dirichlet(np.ones(3), size=6).astype(np.float32)
    prior = None if start is None else backend.asarray(np.asarray(start, np.float32))
    got = mr.ensemble.update_prior(prior, backend.asarray(posteriors), alpha=0.3)
    assert_close(got, reference_update_prior(start, posteriors, alpha=0.3), "prior")


def test_update_prior_known_values():
    # pandas ewm(alpha=0.5, adjust=False) by hand: y0 = x0, y_t = 0.5 y_{t-1} + 0.5 x_t.
    posteriors = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    got = mr.ensemble.update_prior(None, posteriors, alpha=0.5)
    assert_close(got, [0.25, 0.75], "prior")


@pytest.mark.parametrize(
    ("prior", "k"),
    [
        # Plain top-2 of three.
        pytest.param([0.1, 0.6, 0.3], 2, id="top2"),
        # A tie for the second place goes to the lower index.
        pytest.param([0.2, 0.6, 0.2], 2, id="tie"),
        # Batched priors (B, J).
        pytest.param([[0.1, 0.6, 0.3], [0.5, 0.1, 0.4]], 1, id="batched"),
    ],
)
def test_top_k_prior(backend, prior, k):
    prior = np.asarray(prior, np.float32)
    got = mr.ensemble.top_k_prior(backend.asarray(prior), k)
    assert_close(got, reference_top_k_prior(prior, k), "top-k prior")


def _tree(backend, rng):
    def leaf(*shape):
        return backend.asarray(rng.standard_normal(shape).astype(np.float32))

    return {"embed": leaf(4, 3), "layers": [{"w": leaf(3, 3), "b": leaf(3)}, (leaf(2),)]}


def test_average_parameters(backend):
    rng = np.random.default_rng(4)
    trees = [_tree(backend, rng) for _ in range(3)]
    weights = [0.5, 0.0, 1.5]
    got = mr.ensemble.average_parameters(trees, weights)
    want = reference_average_parameters(trees, weights)
    assert isinstance(got["layers"][1], tuple)  # containers keep their type
    assert_close(got["embed"], want["embed"], "embed")
    assert_close(got["layers"][0]["w"], want["layers"][0]["w"], "w")
    assert_close(got["layers"][1][0], want["layers"][1][0], "tuple leaf")
    assert to_numpy(got["embed"]).dtype == np.float32


def test_average_parameters_torch_state_dict_bfloat16():
    torch = pytest.importorskip("torch")
    from collections import OrderedDict

    first = OrderedDict(w=torch.ones(3, dtype=torch.bfloat16))
    second = OrderedDict(w=torch.full((3,), 3.0, dtype=torch.bfloat16))
    got = mr.ensemble.average_parameters([first, second])
    assert isinstance(got, OrderedDict)
    assert got["w"].dtype == torch.bfloat16
    assert torch.equal(got["w"], torch.full((3,), 2.0, dtype=torch.bfloat16))


def test_branch_parameters(backend):
    rng = np.random.default_rng(5)
    trees = [_tree(backend, rng) for _ in range(4)]
    posterior = backend.asarray(np.array([0.1, 0.4, 0.1, 0.4], np.float32))
    params, chosen, weights = mr.ensemble.branch_parameters(trees, posterior, k=3)
    # The two 0.4 experts first (tie to the lower index), then the tie among the 0.1s: expert 0.
    assert chosen == [1, 3, 0]
    assert weights == pytest.approx([4 / 9, 4 / 9, 1 / 9], rel=1e-6)
    want = reference_average_parameters([trees[j] for j in chosen], weights)
    assert_close(params["embed"], want["embed"], "embed")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # Expert counts disagree between prior and likelihoods.
        (lambda: mr.ensemble.domain_posterior(np.zeros((3, 2)), np.ones(3) / 3), "prior"),
        (lambda: mr.ensemble.domain_posterior(np.zeros((3, 2)), np.ones(2), window=0), "window"),
        (
            lambda: mr.ensemble.domain_posterior(np.zeros((3, 2), np.int64), np.ones(2)),
            "log_likelihoods",
        ),
        (lambda: mr.ensemble.update_prior(None, np.ones((2, 2)), alpha=1.5), "alpha"),
        (lambda: mr.ensemble.top_k_prior(np.ones(3), 4), "k"),
        # Structures that do not match.
        (lambda: mr.ensemble.average_parameters([{"a": np.ones(2)}, {"b": np.ones(2)}]), "keys"),
        (lambda: mr.ensemble.average_parameters([np.ones(2), np.ones(3)]), "shapes"),
        (lambda: mr.ensemble.average_parameters([np.ones(2)] * 2, [1.0, -1.0]), "weights"),
        (lambda: mr.ensemble.average_parameters([np.ones(2)] * 2, [1.0]), "weights"),
        (lambda: mr.ensemble.average_parameters([np.arange(2)] * 2), "dtype"),
        (lambda: mr.ensemble.branch_parameters([np.ones(2)] * 2, [0.5, 0.5], k=3), "k"),
    ],
)
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_posterior_under_jit():
    jax = pytest.importorskip("jax")
    if Backend.JAX.unavailable_reason():
        pytest.skip("jax unavailable")
    values = log_likelihoods((6, 3))
    prior = np.array([0.2, 0.5, 0.3], np.float32)
    jitted = jax.jit(lambda v, p: mr.ensemble.domain_posterior(v, p, window=2))
    got = jitted(jax.numpy.asarray(values), jax.numpy.asarray(prior))
    assert_close(got, reference_domain_posterior(values, prior, window=2), "jit", rtol=1e-5)
