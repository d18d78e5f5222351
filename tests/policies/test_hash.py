"""Hash routing, SMoE-Dropout helpers and cosine router logits on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, to_numpy
from moerouter.testing.reference.gates import reference_cosine_router_logits
from moerouter.testing.reference.token_choice import reference_hash, reference_topk

HASHES = [
    # The modulo hash, padding ids (-1) route nowhere.
    pytest.param(None, (12,), id="modulo"),
    # A random lookup table, grouped ids, out-of-vocabulary ids route nowhere.
    pytest.param(mr.random_hash_table(10, 4, seed=0), (2, 8), id="random-table"),
    # k = 2 experts per id, weight 1/2 each.
    pytest.param(mr.random_hash_table(10, 4, seed=1, k=2), (10,), id="random-table-k2"),
    # k = E: every expert for every id.
    pytest.param(mr.random_hash_table(10, 4, seed=2, k=4), (1,), id="k-equals-E-one-token"),
]


@pytest.mark.parametrize(("table", "shape"), HASHES)
def test_hash_router(backend, table, shape):
    rng = np.random.default_rng(70)
    ids = rng.integers(-1, 13, size=shape).astype(np.int32)
    router = mr.HashRouter(num_experts=4, table=table)
    routing = router(backend.asarray(ids))
    assert_routing_equal(routing, reference_hash(ids, 4, table))
    # The decision is a fixed function of the id: the same id, the same experts.
    experts = to_numpy(routing.expert_ids).reshape(-1, router.k)
    flat = ids.reshape(-1)
    for value in set(flat.tolist()):
        rows = experts[flat == value]
        assert np.all(rows == rows[0])
    # Plans, losses and stats work on hash routings like on any other.
    plan = mr.make_plan(routing)
    assert int(to_numpy(plan.num_valid)) == int(np.sum(experts >= 0))
    mr.losses.load_balancing(routing)


def test_balanced_hash_table_balances():
    # Skewed counts (no single id heavier than an expert's fair share): the greedy balanced table
    # spreads the load far better than id mod E.
    counts = 100.0 / np.sqrt(np.arange(1, 201))
    table = mr.balanced_hash_table(counts, 8)
    load = np.bincount(table, weights=counts, minlength=8)
    modulo = np.bincount(np.arange(200) % 8, weights=counts, minlength=8)
    assert load.max() / load.mean() < modulo.max() / modulo.mean()
    assert load.max() / load.mean() < 1.05


def test_random_hash_table_is_seeded():
    # A pure function of its arguments; rows of distinct experts.
    a = mr.random_hash_table(50, 8, seed=3, k=3)
    np.testing.assert_array_equal(a, mr.random_hash_table(50, 8, seed=3, k=3))
    assert all(len(set(row)) == 3 for row in a.tolist())
    assert a.min() >= 0 and a.max() < 8


def test_hash_errors(backend):
    with pytest.raises(ValueError, match="table"):
        mr.HashRouter(4, table=[0, 4])  # expert out of range
    with pytest.raises(ValueError, match="repeats"):
        mr.HashRouter(4, table=[[0, 0]])
    with pytest.raises(TypeError, match="table"):
        mr.HashRouter(4, table=[0.5, 1.0])
    router = mr.HashRouter(4)
    with pytest.raises(TypeError, match="token_ids"):
        router(backend.asarray(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="token_ids"):
        router(backend.asarray(np.zeros((1, 2, 3), np.int32)))
    with pytest.raises(ValueError, match="k"):
        mr.random_hash_table(4, 2, seed=0, k=3)


def test_frozen_random_router(backend):
    # Same seed, same router on every backend; PyTorch's nn.Linear bound 1/sqrt(d).
    router = mr.FrozenRandomRouter(d_model=16, num_experts=8, seed=4)
    assert np.abs(router.weight_matrix).max() <= 0.25
    x = np.random.default_rng(71).standard_normal((12, 16)).astype(np.float32)
    logits = router(backend.asarray(x))
    expected = x.astype(np.float64) @ router.weight_matrix + router.bias_vector
    assert_close(logits, expected, "logits", rtol=1e-5, atol=1e-6)
    # SMoE-Dropout's gate: top-k of the raw logits, softmax over the k selected.
    routing = mr.TopK(8, 2)(logits)
    assert_routing_equal(routing, reference_topk(to_numpy(logits), 2))
    other = mr.FrozenRandomRouter(d_model=16, num_experts=8, seed=5)
    assert not np.array_equal(router.weight_matrix, other.weight_matrix)
    assert mr.FrozenRandomRouter(16, 8, seed=6, bias=False).bias_vector is None
    with pytest.raises(ValueError, match="d_model"):
        router(backend.asarray(np.zeros((2, 15), np.float32)))


def test_frozen_random_router_gets_no_gradient():
    # The router is frozen: only x receives a gradient.
    torch = pytest.importorskip("torch")
    router = mr.FrozenRandomRouter(d_model=4, num_experts=3, seed=7)
    x = torch.randn(5, 4, requires_grad=True)
    router(x).sum().backward()
    assert x.grad is not None


SCHEDULE_POINTS = [
    # The released Transformer-XL schedule: 8 -> 16 linearly over 400k steps.
    pytest.param("linear_increase", 8, 16, [(0, 8), (200_000, 12), (400_000, 16), (10**6, 16)]),
    pytest.param("linear_decrease", 8, 16, [(0, 16), (200_000, 12), (400_000, 8)]),
    # Cosine: fast change early (increase) or late (decrease).
    pytest.param("cosine_increase", 1, 16, [(0, 1), (400_000, 16)]),
    pytest.param("cosine_decrease", 1, 16, [(0, 16), (400_000, 1)]),
    # 0.99 ** (t // (T // 300)): from k_min towards k_max, still 0.99**300 = 5% short at T.
    pytest.param("exp_increase", 2, 16, [(0, 2), (400_000, 15), (2_000_000, 16)]),
    pytest.param("exp_decrease", 2, 16, [(0, 16), (400_000, 3), (2_000_000, 2)]),
    # The official milestones 1, 2, 4, 8, 16, one fifth of training each.
    pytest.param("multi_step_increase", 1, 16, [(0, 1), (80_000, 2), (399_999, 16), (400_000, 16)]),
    pytest.param("multi_step_decrease", 1, 16, [(0, 16), (160_000, 4), (400_000, 1)]),
]


@pytest.mark.parametrize(("mode", "k_min", "k_max", "points"), SCHEDULE_POINTS)
def test_k_schedule_points(mode, k_min, k_max, points):
    for step, k in points:
        assert mr.k_schedule(step, mode=mode, k_min=k_min, k_max=k_max, total_steps=400_000) == k


def official_calculate_gate_number(step, mode, total, k_min, k_max):
    """A transcription of the official new_utils.py::calculate_gate_number (two exp modes)."""
    if mode == "linear_increase":
        k = round((k_max - k_min) * step / total) + k_min
    elif mode == "linear_decrease":
        k = round((k_min - k_max) * step / total) + k_max
    elif mode == "cosine_decrease":
        k = round((k_max - k_min) * np.cos(np.pi * step / (2 * total))) + k_min
    elif mode == "cosine_increase":
        k = round((k_min - k_max) * np.cos(np.pi * step / (2 * total))) + k_max
    else:
        k = round((k_min - k_max) * 0.99 ** (step // (total // 300))) + k_max
    return int(np.clip(k, k_min, k_max))


@settings(max_examples=60, deadline=None, database=None)
@given(
    mode=st.sampled_from(
        ["linear_increase", "linear_decrease", "cosine_increase", "cosine_decrease", "exp_increase"]
    ),
    total=st.integers(300, 5000),
    k_min=st.integers(1, 8),
    spread=st.integers(0, 12),
    data=st.data(),
)
def test_k_schedule_matches_official_and_is_monotone(mode, total, k_min, spread, data):
    k_max = k_min + spread
    step = data.draw(st.integers(0, 2 * total))
    k = mr.k_schedule(step, mode=mode, k_min=k_min, k_max=k_max, total_steps=total)
    assert k == official_calculate_gate_number(step, mode, total, k_min, k_max)
    later = mr.k_schedule(step + 1, mode=mode, k_min=k_min, k_max=k_max, total_steps=total)
    assert later >= k if "increase" in mode else later <= k


def test_k_schedule_errors():
    with pytest.raises(ValueError, match="mode"):
        mr.k_schedule(0, mode="square", k_min=1, k_max=2, total_steps=10)
    with pytest.raises(ValueError, match="k_min"):
        mr.k_schedule(0, mode="linear_increase", k_min=3, k_max=2, total_steps=10)
    with pytest.raises(ValueError, match="step"):
        mr.k_schedule(-1, mode="linear_increase", k_min=1, k_max=2, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        mr.k_schedule(0, mode="exp_increase", k_min=1, k_max=2, total_steps=10)


def test_evaluate_at_k():
    # Self-slimming evaluation: one callable, several k, results keyed by k in order.
    seen = []
    results = mr.evaluate_at_k(lambda k: seen.append(k) or 10.0 - k, [1, 2, 4, 8])
    assert results == {1: 9.0, 2: 8.0, 4: 6.0, 8: 2.0}
    assert seen == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="k"):
        mr.evaluate_at_k(lambda k: 0.0, [0])
    with pytest.raises(TypeError, match="evaluate"):
        mr.evaluate_at_k(3, [1])


COSINE = [
    # Tutel's initial temperature, log(1 / 0.5): scale 2.
    pytest.param(math.log(2.0), False, id="init-scale"),
    # Above the clamp: the scale stops at 100.
    pytest.param(10.0, False, id="clamped"),
    # The learnable log-scale as an array of shape (1,), as Tutel's parameter.
    pytest.param(0.3, True, id="array-scale"),
]


@pytest.mark.parametrize(("log_scale", "as_array"), COSINE)
def test_cosine_router_logits(backend, log_scale, as_array):
    rng = np.random.default_rng(72)
    h = rng.standard_normal((2, 6, 5)).astype(np.float32)
    h[0, 0] = 0.0  # a zero token: eps keeps it finite (all-zero logits)
    w = (rng.standard_normal((5, 4)) * 0.01).astype(np.float32)
    scale = backend.asarray(np.array([log_scale], np.float32)) if as_array else log_scale
    logits = mr.cosine_router_logits(backend.asarray(h), backend.asarray(w), scale)
    expected = reference_cosine_router_logits(h, w, log_scale)
    assert_close(logits, expected, "logits", rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(to_numpy(logits)) <= min(math.exp(log_scale), 100.0) * (1 + 1e-6))


def test_cosine_router_gradients_torch():
    # Gradients reach tokens, embeddings and the temperature (below the clamp), not above it.
    torch = pytest.importorskip("torch")
    h = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    for tau, grad_expected in ((0.5, True), (10.0, False)):
        log_scale = torch.tensor([tau], requires_grad=True)
        mr.cosine_router_logits(h, w, log_scale).square().sum().backward()
        assert (log_scale.grad.abs().sum() > 0) == grad_expected
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_cosine_router_errors(backend):
    h = backend.asarray(np.ones((3, 5), np.float32))
    w = backend.asarray(np.ones((5, 4), np.float32))
    with pytest.raises(ValueError, match="expert_embeddings"):
        mr.cosine_router_logits(h, backend.asarray(np.ones((4, 4), np.float32)), 0.0)
    with pytest.raises(ValueError, match="log_scale"):
        mr.cosine_router_logits(h, w, backend.asarray(np.zeros(2, np.float32)))
    with pytest.raises(TypeError, match="tokens"):
        mr.cosine_router_logits(backend.asarray(np.ones((3, 5), np.int32)), w, 0.0)
    with pytest.raises(TypeError, match="log_scale"):
        mr.cosine_router_logits(h, w, "hot")
