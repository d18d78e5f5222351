"""combine is a fixed-order gather-reduce: bit-identical run to run, and batch invariant."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import to_numpy

NUM_TOKENS, NUM_EXPERTS, FEATURES = 32, 8, 16

ROUTERS = [
    # Token layout: k = 4 terms per token.
    pytest.param(lambda: mr.TopK(num_experts=NUM_EXPERTS, k=4), id="topk"),
    # Expert layout: a variable number of terms per token, gathered by token.
    pytest.param(lambda: mr.ExpertChoice(num_experts=NUM_EXPERTS, capacity_factor=2.0), id="ec"),
]

BATCH_ROUTERS = [
    ROUTERS[0],
    # Expert choice with C = S: every expert takes token 0 whatever the others do, but at a rank
    # (so a dispatch row) that depends on the other tokens.
    pytest.param(lambda: mr.ExpertChoice(num_experts=NUM_EXPERTS, capacity_factor=8.0), id="ec"),
]


def expert_rows(x, routing, plan):
    """Each dispatch row's expert output, a pure function of (token, expert), made in NumPy.

    The same (token, expert) pair gets bit-identical values wherever its row lands, so any
    difference in ``combine`` comes from the reduction itself.
    """
    tokens = to_numpy(plan.source_tokens)
    experts = to_numpy(routing.expert_ids)[to_numpy(plan.order)]
    scale = np.linspace(0.5, 2.0, NUM_EXPERTS, dtype=np.float32)
    rows = np.sin(x[tokens] * scale[np.clip(experts, 0, None), None] + experts[:, None])
    return rows.astype(np.float32)


@pytest.mark.parametrize("make_router", ROUTERS)
def test_combine_is_bit_identical_run_to_run(backend, make_router):
    rng = np.random.default_rng(21)
    logits = backend.asarray(rng.standard_normal((NUM_TOKENS, NUM_EXPERTS)).astype(np.float32))
    plan = mr.make_plan(make_router()(logits))
    ye = backend.asarray(rng.standard_normal((plan.num_rows, FEATURES)).astype(np.float32))
    first, second = to_numpy(mr.combine(ye, plan)), to_numpy(mr.combine(ye, plan))
    assert np.array_equal(first, second)


@pytest.mark.parametrize("make_router", BATCH_ROUTERS)
def test_batch_invariance(backend, make_router):
    # Re-route every other token: the first token's experts are unchanged, so its output must be
    # bit-identical, although its rows now sit elsewhere in the dispatch buffer.
    rng = np.random.default_rng(22)
    logits = rng.standard_normal((NUM_TOKENS, NUM_EXPERTS)).astype(np.float32)
    x = rng.standard_normal((NUM_TOKENS, FEATURES)).astype(np.float32)
    other = logits.copy()
    other[1:] = rng.standard_normal((NUM_TOKENS - 1, NUM_EXPERTS)) * 3.0
    outputs, assignments = [], []
    for values in (logits, other):
        routing = make_router()(backend.asarray(values))
        plan = mr.make_plan(routing)
        ye = backend.asarray(expert_rows(x, routing, plan))
        outputs.append(to_numpy(mr.combine(ye, plan))[0])
        mine = to_numpy(routing.token_ids) == 0
        assignments.append(to_numpy(routing.expert_ids)[mine].tolist())
        assignments.append(to_numpy(plan.inverse)[mine].tolist())
    assert assignments[0] == assignments[2]  # same experts for token 0 ...
    assert assignments[1] != assignments[3]  # ... at other dispatch rows
    assert np.array_equal(outputs[0], outputs[1])
