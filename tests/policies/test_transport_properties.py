"""Sinkhorn, BASE, sparsity-constrained and Soft MoE routers: invariants, ties, edge sizes, errors,
optimality against SciPy, and tracing under ``jax.jit`` / ``torch.compile``.

Property tests use random sizes (T = 1, E = 1, k = E and C > S included) and small-integer logits
with -inf entries, so ties are common; they check invariants that hold whatever the ties, on
NumPy and array_api_strict (the agnostic path).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moerouter as mr
from moerouter.testing import Backend, assert_close, assert_routing_equal, to_numpy

BACKENDS = [
    # The NumPy namespace.
    pytest.param(Backend.NUMPY, id="numpy"),
    # array_api_strict: proof nothing relies on NumPy-only behaviour.
    pytest.param(Backend.ARRAY_API_STRICT, id="array_api_strict"),
]
PROPERTY = settings(max_examples=25, deadline=None, database=None)
ENTRIES = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, -math.inf])


@st.composite
def grouped_logits(draw, *, multiple_of_experts=False, finite=False):
    groups = draw(st.integers(1, 2))
    experts = draw(st.integers(1, 5))
    group_size = (
        draw(st.integers(1, 3)) * experts if multiple_of_experts else draw(st.integers(1, 9))
    )
    entries = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0]) if finite else ENTRIES
    size = groups * group_size * experts
    flat = draw(st.lists(entries, min_size=size, max_size=size))
    logits = np.asarray(flat, np.float32).reshape(groups, group_size, experts)
    return logits, experts


def routable(logits):
    """Pairs a router may use: finite row (some entry above -inf) and entry above -inf."""
    rows = np.isfinite(logits).any(-1, keepdims=True)
    return rows & np.isfinite(logits)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=grouped_logits(), k_fraction=st.floats(0.0, 1.0))
@PROPERTY
def test_sinkhorn_token_choice_invariants(backend, data, k_fraction):
    logits, experts = data
    k = 1 + int(k_fraction * (experts - 1))  # 1 .. E
    routing = mr.SinkhornTokenChoice(num_experts=experts, k=k)(backend.asarray(logits))
    expert_ids = to_numpy(routing.expert_ids).reshape(-1, k)
    choice = to_numpy(routing.choice_ids).reshape(-1, k)
    weights = to_numpy(routing.weights).reshape(-1, k)
    # k distinct choices per token; real experts only where routable; weight 0 elsewhere.
    assert all(len(set(row)) == k for row in choice.tolist())
    ok = np.take_along_axis(routable(logits).reshape(-1, experts), choice, axis=1)
    np.testing.assert_array_equal(expert_ids, np.where(ok, choice, -1))
    assert np.all(weights[expert_ids < 0] == 0) and np.all(weights >= 0)
    # Weights are the softmax probabilities of the chosen experts (normalize=False).
    probs = to_numpy(routing.probs)
    np.testing.assert_allclose(
        weights, np.where(ok, np.take_along_axis(probs, choice, axis=1), 0), rtol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=grouped_logits(), capacity_factor=st.sampled_from([0.5, 1.0, 3.0, 100.0]))
@PROPERTY
def test_expert_choice_family_invariants(backend, data, capacity_factor):
    logits, experts = data
    group_size = logits.shape[1]
    for router in (
        mr.SinkhornExpertChoice(num_experts=experts, capacity_factor=capacity_factor),
        mr.SparsityConstrainedExpertChoice(num_experts=experts, capacity_factor=capacity_factor),
    ):
        routing = router(backend.asarray(logits))
        per_expert = min(math.ceil(capacity_factor * group_size / experts), group_size)
        assert routing.slots == per_expert == router.capacity(group_size)  # C > S is capped
        tokens = to_numpy(routing.token_ids).reshape(logits.shape[0], experts, per_expert)
        expert_ids = to_numpy(routing.expert_ids).reshape(tokens.shape)
        for g in range(logits.shape[0]):
            for e in range(experts):
                column = tokens[g, e] - g * group_size
                assert len(set(column.tolist())) == per_expert  # distinct tokens of its group
                ok = routable(logits)[g, column, e]
                np.testing.assert_array_equal(expert_ids[g, e], np.where(ok, e, -1))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=grouped_logits(multiple_of_experts=True, finite=True))
@PROPERTY
def test_balanced_assignment_is_exactly_balanced(backend, data):
    # With finite logits every expert gets exactly S / E tokens of every group, ties or not.
    # (Decisions are not compared with the float64 twin here: integer logits make float32
    # near-ties between plan entries of different tokens, where the two may legitimately differ.)
    logits, experts = data
    routing = mr.BalancedAssignment(num_experts=experts)(backend.asarray(logits))
    expert_ids = to_numpy(routing.expert_ids).reshape(logits.shape[:2])
    for group in expert_ids:
        np.testing.assert_array_equal(
            np.bincount(group, minlength=experts), logits.shape[1] // experts
        )


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=grouped_logits(), slots=st.integers(1, 3))
@PROPERTY
def test_soft_moe_invariants(backend, data, slots):
    logits, experts = data
    logits = np.repeat(logits, slots, axis=-1)  # E * P columns, ties across slots
    soft = mr.SoftMoE(num_experts=experts, slots_per_expert=slots)(backend.asarray(logits))
    dispatch, combine = to_numpy(soft.dispatch_weights), to_numpy(soft.combine_weights)
    ok = routable(logits)
    # A slot reached by some routable token sums to 1 over tokens, else it is all 0.
    np.testing.assert_allclose(dispatch.sum(axis=1), ok.any(axis=1).astype(float), atol=1e-6)
    np.testing.assert_allclose(combine.sum(axis=2), ok.any(axis=2).astype(float), atol=1e-6)
    assert np.all(dispatch[~ok] == 0) and np.all(combine[~ok] == 0)


ALL_EQUAL_ROUTERS = [
    # Uniform plan; each token's tie goes to experts 0 .. k-1.
    pytest.param(lambda: mr.SinkhornTokenChoice(num_experts=4, k=2), id="sinkhorn-tc"),
    # Every expert's tie goes to tokens 0 .. C-1.
    pytest.param(lambda: mr.SinkhornExpertChoice(num_experts=4), id="sinkhorn-ec"),
    # Same for the sparse plan (exact zeros and equal entries).
    pytest.param(lambda: mr.SparsityConstrainedExpertChoice(num_experts=4), id="sparse-ec"),
    # Round r: remaining tokens all propose to expert r, which keeps the lowest indices.
    pytest.param(lambda: mr.BalancedAssignment(num_experts=4), id="balanced"),
]
ALL_EQUAL_EXPECTED = {
    "SinkhornTokenChoice": np.tile([0, 1], 8),
    "SinkhornExpertChoice": np.tile([0, 1], 4),
    "SparsityConstrainedExpertChoice": np.tile([0, 1], 4),
    "BalancedAssignment": np.repeat([0, 1, 2, 3], 2),
}


@pytest.mark.parametrize("make_router", ALL_EQUAL_ROUTERS)
def test_exact_ties_on_every_backend(backend, make_router):
    # All logits equal: every comparison is an exact tie, resolved to the lower index on every
    # backend (expert index inside a token, token index inside an expert).
    router = make_router()
    routing = router(backend.asarray(np.zeros((8, 4), np.float32)))
    name = type(router).__name__
    ids = (
        routing.expert_ids
        if name in ("SinkhornTokenChoice", "BalancedAssignment")
        else (routing.token_ids)
    )
    np.testing.assert_array_equal(to_numpy(ids), ALL_EQUAL_EXPECTED[name])


def test_single_token_and_single_expert():
    # T = 1 and E = 1: Sinkhorn, BASE and Soft MoE degenerate to "the only choice".
    one = np.asarray([[1.5]], np.float32)
    assert to_numpy(mr.SinkhornTokenChoice(num_experts=1)(one).expert_ids).tolist() == [0]
    assert to_numpy(mr.BalancedAssignment(num_experts=1)(one).expert_ids).tolist() == [0]
    soft = mr.SoftMoE(num_experts=1, slots_per_expert=2)(np.asarray([[1.0, -1.0]], np.float32))
    np.testing.assert_allclose(to_numpy(soft.dispatch_weights), [[1.0, 1.0]])
    # T = 1, k = E: a single token's plan row is forced uniform (column marginals 1/E), so the
    # order is rounding; what is certain is that every expert is chosen exactly once.
    row = np.asarray([[3.0, 0.0, 1.0]], np.float32)
    chosen = to_numpy(mr.SinkhornTokenChoice(num_experts=3, k=3)(row).expert_ids)
    assert sorted(chosen.tolist()) == [0, 1, 2]


def _optimum(affinity, per_expert):
    from scipy.optimize import linear_sum_assignment

    columns = np.repeat(affinity, per_expert, axis=1)
    rows, cols = linear_sum_assignment(columns, maximize=True)
    return float(columns[rows, cols].sum())


def test_balanced_assignment_optimal_on_planted_cases():
    # A planted balanced assignment with margin 3 over N(0, 0.3) noise is the unique optimum
    # (SciPy agrees); the Sinkhorn + rounding solver must find it exactly.
    pytest.importorskip("scipy")
    rng = np.random.default_rng(50)
    for _ in range(5):
        group_size, experts = 16, 4
        planted = rng.permutation(np.repeat(np.arange(experts), group_size // experts))
        affinity = rng.standard_normal((group_size, experts)) * 0.3
        affinity[np.arange(group_size), planted] += 3.0
        affinity = affinity.astype(np.float32)
        routing = mr.BalancedAssignment(num_experts=experts)(affinity)
        chosen = to_numpy(routing.expert_ids)
        np.testing.assert_array_equal(chosen, planted)
        total = float(affinity[np.arange(group_size), chosen].sum())
        assert total == pytest.approx(_optimum(affinity, group_size // experts), rel=1e-6)


def test_balanced_assignment_near_optimal_on_random_cases():
    # Documented accuracy: on N(0, 1) affinities, S = 16, E = 4, the total affinity is within
    # 1 % of SciPy's optimum on average (measured 0.65 % over 20 groups) and exact for most.
    pytest.importorskip("scipy")
    rng = np.random.default_rng(51)
    gaps, exact = [], 0
    for _ in range(20):
        affinity = rng.standard_normal((16, 4)).astype(np.float32)
        chosen = to_numpy(mr.BalancedAssignment(num_experts=4)(affinity).expert_ids)
        np.testing.assert_array_equal(np.bincount(chosen, minlength=4), 4)
        total = float(affinity[np.arange(16), chosen].sum())
        optimum = _optimum(affinity, 4)
        assert total <= optimum + 1e-4
        gaps.append((optimum - total) / abs(optimum))
        exact += optimum - total < 1e-4
    assert np.mean(gaps) < 0.01 and exact >= 12


BAD = [
    # k above E.
    pytest.param(lambda: mr.SinkhornTokenChoice(num_experts=2, k=3), ValueError, "k must be"),
    # epsilon must be positive.
    pytest.param(lambda: mr.SinkhornTokenChoice(num_experts=2, epsilon=0.0), ValueError, "epsilon"),
    # A fixed iteration count of at least one.
    pytest.param(
        lambda: mr.SinkhornExpertChoice(num_experts=2, num_iters=0), ValueError, "num_iters"
    ),
    # noisy_combine is a flag.
    pytest.param(
        lambda: mr.SinkhornExpertChoice(num_experts=2, noisy_combine=1), TypeError, "noisy_combine"
    ),
    # Expert choice needs a capacity factor.
    pytest.param(
        lambda: mr.SinkhornExpertChoice(num_experts=2, capacity_factor=None),
        TypeError,
        "capacity_factor",
    ),
    # Unknown drop policy.
    pytest.param(
        lambda: mr.SinkhornTokenChoice(num_experts=2, drop_policy="random"),
        ValueError,
        "drop_policy",
    ),
    # BASE: epsilon as a string.
    pytest.param(lambda: mr.BalancedAssignment(num_experts=2, epsilon="x"), TypeError, "epsilon"),
    # Sparse expert choice: negative learning rate.
    pytest.param(
        lambda: mr.SparsityConstrainedExpertChoice(num_experts=2, learning_rate=-1.0),
        ValueError,
        "learning_rate",
    ),
    # Sparse expert choice: gamma 0.
    pytest.param(
        lambda: mr.SparsityConstrainedExpertChoice(num_experts=2, gamma=0.0), ValueError, "gamma"
    ),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD)
def test_bad_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs():
    logits = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match="multiple of num_experts"):
        mr.BalancedAssignment(num_experts=4)(np.zeros((6, 4), np.float32))
    with pytest.raises(ValueError, match="noise must have the shape"):
        mr.SinkhornTokenChoice(num_experts=3)(logits, np.zeros((6, 2), np.float32))
    with pytest.raises(TypeError, match="noise must be a real floating"):
        mr.SinkhornExpertChoice(num_experts=3)(logits, np.zeros((6, 3), np.int32))
    with pytest.raises(TypeError, match="noise must be an array"):
        mr.SinkhornTokenChoice(num_experts=3)(logits, 0.1)
    with pytest.raises(ValueError, match="num_experts = 4"):
        mr.SinkhornTokenChoice(num_experts=4)(logits)
    with pytest.raises(TypeError, match="logits must be a real floating"):
        mr.SparsityConstrainedExpertChoice(num_experts=3)(np.zeros((6, 3), np.int32))
    with pytest.raises(ValueError, match="strict"):
        bad = logits.copy()
        bad[0, 0] = np.nan
        mr.SinkhornTokenChoice(num_experts=3, strict=True)(bad)


def test_noise_from_another_backend():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="same backend"):
        mr.SinkhornTokenChoice(num_experts=3)(strict.zeros((6, 3)), np.zeros((6, 3), np.float32))


# Few Sinkhorn iterations: the loop is unrolled when traced, and tracing (not convergence) is what
# these tests are about; more iterations only lengthen compilation on a 2-core machine.
TRACED = [
    # Log-domain Sinkhorn loop unrolled, token layout with capacity.
    pytest.param(
        lambda: mr.SinkhornTokenChoice(num_experts=8, k=2, capacity_factor=1.0, num_iters=5),
        id="sinkhorn-tc",
    ),
    # Sinkhorn, expert layout.
    pytest.param(
        lambda: mr.SinkhornExpertChoice(num_experts=8, capacity_factor=2.0, num_iters=5),
        id="sinkhorn-ec",
    ),
    # E proposal rounds after Sinkhorn.
    pytest.param(lambda: mr.BalancedAssignment(num_experts=8, num_iters=5), id="balanced"),
    # Adam on the semi-dual, sort + cumulative sum projections.
    pytest.param(
        lambda: mr.SparsityConstrainedExpertChoice(num_experts=8, num_steps=5), id="sparse-ec"
    ),
]


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")


@pytest.mark.parametrize("make_router", TRACED)
def test_jax_jit_equals_eager(reference_backend, make_router):
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    from moerouter.testing import edge_case_logits

    router = make_router()
    logits = jax.numpy.asarray(edge_case_logits(2, 16, 8, seed=52))
    eager = router(logits)
    jitted = jax.jit(router)(logits)
    # XLA may fuse the float32 Sinkhorn arithmetic differently: weights to rounding.
    assert_routing_equal(jitted, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
# Token layout with capacity (Sinkhorn) and the proposal rounds; the expert layouts trace the
# same primitives and are left to the JAX test.
@pytest.mark.parametrize("make_router", [TRACED[0], TRACED[2]])
def test_torch_compile_equals_eager(reference_backend, make_router):
    torch = pytest.importorskip("torch")
    from moerouter.testing import edge_case_logits

    router = make_router()
    logits = torch.asarray(edge_case_logits(1, 16, 8, seed=53)[0])

    def layer(logits):
        routing = router(logits)
        return routing.expert_ids, routing.token_ids, routing.weights

    eager = layer(logits)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(logits)
    np.testing.assert_array_equal(to_numpy(compiled[0]), to_numpy(eager[0]))
    np.testing.assert_array_equal(to_numpy(compiled[1]), to_numpy(eager[1]))
    assert_close(compiled[2], eager[2], "weights", rtol=1e-6, atol=0.0)


GRADIENT_ROUTERS = [
    # Softmax weights of the chosen experts (the plan only selects).
    pytest.param(lambda: mr.SinkhornTokenChoice(num_experts=4, k=2), "softmax", id="sinkhorn-tc"),
    # Softmax weights of the chosen tokens, expert layout.
    pytest.param(lambda: mr.SinkhornExpertChoice(num_experts=4), "softmax", id="sinkhorn-ec"),
    # BASE gate: sigmoid of the assigned logit.
    pytest.param(lambda: mr.BalancedAssignment(num_experts=4), "sigmoid", id="balanced"),
    # Softmax weights after the Adam/projection solve.
    pytest.param(lambda: mr.SparsityConstrainedExpertChoice(num_experts=4), "softmax", id="sparse"),
]
GRAD_LOGITS = np.random.default_rng(60).standard_normal((8, 4)).astype(np.float32)


def _expected_gradient(routing, gate):
    """d/d logits of sum_r c_r * w_r in float64, the decision held fixed; c_r = r + 1."""
    tokens, experts = to_numpy(routing.token_ids), to_numpy(routing.expert_ids)
    logits = GRAD_LOGITS.astype(np.float64)
    grad = np.zeros_like(logits)
    for r, (t, e) in enumerate(zip(tokens, experts, strict=True)):
        if e < 0:
            continue
        c = r + 1.0
        if gate == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-logits[t, e]))
            grad[t, e] += c * s * (1 - s)
        else:
            p = np.exp(logits[t] - logits[t].max())
            p /= p.sum()
            grad[t] += c * p[e] * ((np.arange(4) == e) - p)
    return grad


@pytest.mark.parametrize(("make_router", "gate"), GRADIENT_ROUTERS)
def test_gradients_reach_the_logits(make_router, gate):
    # Torch autograd and jax.grad of a weighted sum of the combine weights equal the float64
    # gradient of the softmax (or sigmoid) gate, with no NaN from the transport solve.
    router = make_router()
    torch = pytest.importorskip("torch")
    logits = torch.asarray(GRAD_LOGITS, requires_grad=True)
    routing = router(logits)
    coefficients = torch.arange(1, routing.weights.shape[0] + 1, dtype=torch.float32)
    torch.sum(routing.weights * coefficients).backward()
    expected = _expected_gradient(routing, gate)
    assert_close(logits.grad, expected, "torch d logits", rtol=1e-4, atol=1e-6)

    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")

    def loss(values):
        weights = router(values).weights
        return jax.numpy.sum(weights * jax.numpy.arange(1, weights.shape[0] + 1))

    grad = jax.grad(loss)(jax.numpy.asarray(GRAD_LOGITS))
    assert_close(grad, expected, "jax d logits", rtol=1e-4, atol=1e-6)
