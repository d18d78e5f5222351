"""HashRouter and its tables (Roller et al. 2021) on every backend against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_routing_equal, to_numpy
from moerouter.testing.reference.token_choice import reference_hash

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
