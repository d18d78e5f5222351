"""Failure model: a -inf logit is a hard "never here", and nothing nearby turns into NaN.

Users mask experts with -inf (a forbidden expert, a padded column, a locality or group limit), and
the contract says such a pair is never routed: an assignment with ``expert_ids >= 0`` never lands
on a -inf logit, on any policy, token choice or expert choice, with any mix of -inf entries,
all -inf rows and non-finite rows. Once routed, ``combine`` must stay finite for finite expert
outputs even when the rows that belong to no assignment (dropped, padding, -1) hold inf or NaN:
a -1 row contributes exactly nothing (no ``0 * inf``), on every backend and for both plan
layouts (packed and padded to capacity).

The property test draws random -inf masks for every public policy on NumPy and array_api_strict
(the agnostic path); a derandomised pass with fewer examples runs the same checks on torch, JAX and
CuPy (their own plan and combine kernels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from public_calls import POLICIES as REGISTRY
from public_calls import public_policies

import moerouter as mr
from moerouter.testing import Backend, to_numpy

# Modest example counts and no deadline: fast, free of timing flakes, nothing left behind.
PROPERTY = settings(max_examples=25, deadline=None, database=None)

# The policy registry (public_calls.POLICIES) gives each policy's settings builder, or the
# reason no logit reaches it.
POLICIES = {name: case.neg_inf for name, case in REGISTRY.items() if callable(case.neg_inf)}
NO_LOGITS = {name: case.neg_inf for name, case in REGISTRY.items() if isinstance(case.neg_inf, str)}

# BASE layers' exactly balanced assignment needs groups of a multiple of E tokens.
GROUPS_OF_E_TOKENS = {"BalancedAssignment"}


def test_every_policy_is_covered():
    # A new policy must join public_calls.POLICIES (a builder, or why logits never reach it).
    assert public_policies() == set(POLICIES) | set(NO_LOGITS)


@st.composite
def masked_logits(
    draw: Any, columns: int, tokens_multiple_of: int = 1, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """(T, E') or (G, S, E') float32 logits with a random -inf mask and a few bad rows.

    ``shape`` fixes (G, S); otherwise they are drawn, S a multiple of ``tokens_multiple_of``.
    """
    if shape is None:
        groups = draw(st.integers(1, 3))
        group_size = draw(st.integers(1, 9)) * tokens_multiple_of
    else:
        groups, group_size = shape
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.1, 0.4, 0.8, 0.95]))
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((groups, group_size, columns)) * 2).astype(np.float32)
    logits[rng.random(logits.shape) < density] = -np.inf
    # A few rows entirely -inf, holding NaN or holding +inf: the non-finite rows.
    for value in (-np.inf, np.nan, np.inf):
        rows = rng.random((groups, group_size)) < 0.08
        logits[rows, rng.integers(0, columns)] = value
        if value == -np.inf:
            logits[rows] = -np.inf
    return logits if groups > 1 or draw(st.booleans()) else logits[0]


def finite_rows(logits: np.ndarray) -> np.ndarray:
    flat = logits.reshape(-1, logits.shape[-1])
    ok = np.all(np.isfinite(flat) | (flat == -np.inf), axis=-1)
    return ok & np.any(flat > -np.inf, axis=-1)


def check_routing(backend: Backend, routing: Any, logits: np.ndarray) -> None:
    flat = logits.reshape(-1, logits.shape[-1])
    tokens = to_numpy(routing.token_ids)
    experts = to_numpy(routing.expert_ids)
    weights = to_numpy(routing.weights)
    real = experts >= 0
    landed = flat[tokens[real], experts[real]]
    assert np.all(landed > -np.inf), (
        f"routed to a -inf logit: tokens {tokens[real][landed == -np.inf].tolist()}"
    )
    assert np.all(finite_rows(logits)[tokens[real]]), "a non-finite row was routed"
    assert np.all(np.isfinite(weights))
    assert np.all(weights[~real] == 0)
    np.testing.assert_array_equal(to_numpy(routing.finite_rows), finite_rows(logits))
    for pad in (False, True):
        if pad and routing.capacity is None and routing.layout != "expert":
            continue  # no capacity to pad to
        check_combine(backend, mr.make_plan(routing, pad_to_capacity=pad))


def check_combine(backend: Backend, plan: Any) -> None:
    """Finite expert outputs on the rows combine reads, inf on every other row."""
    rows = to_numpy(plan.combine_rows)
    used = np.zeros(plan.num_rows, bool)
    used[rows[rows >= 0]] = True
    values = np.random.default_rng(0).standard_normal((plan.num_rows, 3)).astype(np.float32)
    clean = np.where(used[:, None], values, 0.0).astype(np.float32)
    poisoned = np.where(used[:, None], values, np.inf).astype(np.float32)
    y_clean = to_numpy(mr.combine(backend.asarray(clean), plan))
    y_poisoned = to_numpy(mr.combine(backend.asarray(poisoned), plan))
    assert np.all(np.isfinite(y_poisoned)), "an unused row leaked inf or NaN into combine"
    # Exactly nothing, not a rounding of nothing.
    np.testing.assert_array_equal(y_poisoned, y_clean)


def check_soft(backend: Backend, soft: Any, logits: np.ndarray) -> None:
    masked = np.isneginf(logits) | ~finite_rows(logits).reshape(logits.shape[:-1])[..., None]
    for name in ("dispatch_weights", "combine_weights"):
        weights = to_numpy(getattr(soft, name))
        assert np.all(np.isfinite(weights)), name
        assert np.all(weights[masked] == 0), f"{name} weighs a -inf logit"
    x = np.random.default_rng(1).standard_normal((*logits.shape[:-1], 3)).astype(np.float32)
    xe = mr.dispatch(backend.asarray(x), soft)
    ye = np.random.default_rng(2).standard_normal(tuple(xe.shape)).astype(np.float32)
    assert np.all(np.isfinite(to_numpy(xe)))
    assert np.all(np.isfinite(to_numpy(mr.combine(backend.asarray(ye), soft))))


def check(backend: Backend, result: Any, logits: np.ndarray) -> None:
    if isinstance(result, mr.SoftRouting):
        check_soft(backend, result, logits)
    else:
        check_routing(backend, result, logits)


@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.ARRAY_API_STRICT], ids=str)
@pytest.mark.parametrize("policy", sorted(POLICIES))
@PROPERTY
@given(data=st.data(), experts=st.integers(1, 6))
def test_random_neg_inf_masks(backend, policy, data, experts):
    columns, route = POLICIES[policy](data.draw, experts)
    logits = data.draw(masked_logits(columns, experts if policy in GROUPS_OF_E_TOKENS else 1))
    check(backend, route(backend, logits), logits)


FRAMEWORKS = [
    pytest.param(Backend.TORCH, id="torch"),
    # JAX compiles each op for every new shape: about 10 s per new capacity on 2 CPU cores.
    pytest.param(Backend.JAX, id="jax", marks=pytest.mark.slow),
    pytest.param(Backend.CUPY, id="cupy"),
]


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=2, deadline=None, database=None, derandomize=True)
@given(data=st.data())
def test_neg_inf_masks_frameworks(backend, policy, data):
    # The same checks on the framework plugins (their own plan and combine kernels), at a few
    # fixed draws of one shape: JAX compiles every op per shape, and that is most of the time.
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    columns, route = POLICIES[policy](data.draw, 4)
    logits = data.draw(masked_logits(columns, shape=(2, 8)))
    check(backend, route(backend, logits), logits)


def test_issue_reproducers(backend):
    # issue 17: tokens 0 and 3 went to expert 1 through their -inf logits.
    inf = np.inf
    logits = np.array([[0, -inf, 1], [1, 2, -inf], [0.5, 0.5, 0.5], [3, -inf, 0]], np.float32)
    routing = mr.ExpertChoice(3, capacity_factor=3.0)(backend.asarray(logits))
    check_routing(backend, routing, logits)
    by_expert = to_numpy(routing.expert_ids).reshape(3, 4)
    assert by_expert[1].tolist() == [1, 1, -1, -1]
    # issue 14: an inf expert output on token 0's expert-0 row became NaN in combine.
    routing = mr.ExpertChoice(2, capacity_factor=2.0)(
        backend.asarray(np.array([[-inf, 0], [0, 0]], np.float32))
    )
    plan = mr.make_plan(routing)
    ye = np.full((plan.num_rows, 1), np.inf, np.float32)
    ye[: int(to_numpy(plan.num_valid))] = 1.0
    assert np.all(np.isfinite(to_numpy(mr.combine(backend.asarray(ye), plan))))
