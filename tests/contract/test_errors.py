"""Bad input gets a clear error naming the parameter (DESIGN.md, "Bad input")."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import to_numpy

LOGITS = np.asarray([[1.0, 2.0, 0.5, -1.0], [0.0, 0.1, 3.0, 2.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        # k below 1.
        pytest.param(lambda: mr.TopK(num_experts=4, k=0), ValueError, "k must be >= 1"),
        # k above E.
        pytest.param(lambda: mr.TopK(num_experts=4, k=5), ValueError, "k must be <= num_experts"),
        # k above E + m for null experts (k may exceed E alone).
        pytest.param(
            lambda: mr.NullExperts(num_experts=2, num_null=1, k=4),
            ValueError,
            "k must be <= num_experts \\+ num_null",
        ),
        # Zero capacity would drop everything.
        pytest.param(
            lambda: mr.TopK(num_experts=4, k=1, capacity_factor=0.0),
            ValueError,
            "capacity_factor must be a finite number > 0",
        ),
        # Negative capacity for expert choice.
        pytest.param(
            lambda: mr.ExpertChoice(num_experts=4, capacity_factor=-1.0),
            ValueError,
            "capacity_factor",
        ),
        # NaN capacity is not > 0 either.
        pytest.param(
            lambda: mr.NullExperts(num_experts=4, num_null=2, k=2, capacity_factor=float("nan")),
            ValueError,
            "capacity_factor",
        ),
        # Expert choice has no "no capacity" mode.
        pytest.param(
            lambda: mr.ExpertChoice(num_experts=4, capacity_factor=None),
            TypeError,
            "capacity_factor must be a number",
        ),
        # A float expert count is a type error, not silently truncated.
        pytest.param(
            lambda: mr.TopK(num_experts=4.0, k=1), TypeError, "num_experts must be an int"
        ),
        # bool is an int subclass but never a count.
        pytest.param(lambda: mr.TopK(num_experts=4, k=True), TypeError, "k must be an int"),
        # Negative null count.
        pytest.param(
            lambda: mr.NullExperts(num_experts=4, num_null=-1, k=1), ValueError, "num_null"
        ),
        # Unknown score function.
        pytest.param(lambda: mr.TopK(num_experts=4, k=1, score="relu"), ValueError, "score"),
        # Unknown drop policy.
        pytest.param(
            lambda: mr.TopK(num_experts=4, k=1, capacity_factor=1.0, drop_policy="random"),
            ValueError,
            "drop_policy",
        ),
        # capacity_multiple_of must be a positive int.
        pytest.param(
            lambda: mr.ExpertChoice(num_experts=4, capacity_multiple_of=0),
            ValueError,
            "capacity_multiple_of",
        ),
    ],
)
def test_bad_hyper_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


ROUTERS = [
    # Each policy validates its own column count.
    pytest.param(lambda: mr.TopK(num_experts=4, k=2), "num_experts", id="topk"),
    pytest.param(
        lambda: mr.NullExperts(num_experts=2, num_null=2, k=2),
        "num_experts \\+ num_null",
        id="null",
    ),
    pytest.param(lambda: mr.ExpertChoice(num_experts=4), "num_experts", id="expert-choice"),
]


@pytest.mark.parametrize(("make_router", "columns_name"), ROUTERS)
def test_bad_logits(backend, make_router, columns_name):
    router = make_router()
    # Rank 1: a single token must still be (1, E).
    with pytest.raises(ValueError, match="logits must have shape"):
        router(backend.asarray(LOGITS[0]))
    # Rank 4: groups of groups are not a thing.
    with pytest.raises(ValueError, match="logits must have shape"):
        router(backend.asarray(LOGITS[None, None]))
    # Last dimension is not E'.
    with (
        pytest.raises(ValueError, match=f"{columns_name} = 4")
        if "null" not in columns_name
        else (pytest.raises(ValueError, match=columns_name))
    ):
        router(backend.asarray(LOGITS[:, :3]))
    # Integer logits: routing on rounded integers is almost always a bug upstream.
    with pytest.raises(TypeError, match="logits must be a real floating dtype"):
        router(backend.asarray(LOGITS.astype(np.int32)))
    # No tokens at all is not an error: an empty routing (tests/reliability/test_zero_tokens.py).
    assert router(backend.asarray(LOGITS[:0])).num_tokens == 0


def test_logits_must_be_an_array():
    # A nested list is not an array: no silent conversion to some default backend.
    with pytest.raises(TypeError, match="logits must be an array"):
        mr.TopK(num_experts=2, k=1)([[1.0, 0.0]])


@pytest.fixture
def plan():
    return mr.make_plan(mr.TopK(num_experts=4, k=2)(LOGITS))


def test_wrong_row_counts(plan):
    # x must have one row per token.
    with pytest.raises(ValueError, match="x has 3 rows but the plan routes 2 tokens"):
        mr.dispatch(np.zeros((3, 5), np.float32), plan)
    # ye must have one row per dispatch row.
    with pytest.raises(ValueError, match="ye has 3 rows but the plan has 4"):
        mr.combine(np.zeros((3, 5), np.float32), plan)
    # Features must be a separate axis.
    with pytest.raises(ValueError, match="x must have shape \\(rows, features\\)"):
        mr.dispatch(np.zeros(2, np.float32), plan)
    with pytest.raises(ValueError, match="ye must have shape \\(rows, features\\)"):
        mr.combine(np.zeros((4, 5, 1), np.float32), plan)


def test_wrong_object_types(plan):
    # Arguments swapped or a dict passed: say which parameter is wrong.
    with pytest.raises(TypeError, match=r"routing must be a moerouter\.Routing"):
        mr.make_plan(plan)
    with pytest.raises(TypeError, match=r"plan must be a moerouter\.Plan"):
        mr.dispatch(np.zeros((2, 5), np.float32), {"order": None})
    with pytest.raises(TypeError, match=r"routing must be a moerouter\.Routing"):
        mr.losses.load_balancing(plan)
    with pytest.raises(TypeError, match=r"routing must be a moerouter\.Routing"):
        mr.stats.summary(plan)


def test_bad_loss_options():
    routing = mr.TopK(num_experts=4, k=2)(LOGITS)
    with pytest.raises(ValueError, match="convention must be one of"):
        mr.losses.load_balancing(routing, convention="switch")
    with pytest.raises(ValueError, match="null_mode must be"):
        mr.losses.null_load_balancing(routing, null_mode="mean")
    with pytest.raises(ValueError, match="logits must have shape"):
        mr.losses.z_loss(LOGITS[0])
    with pytest.raises(TypeError, match="real floating dtype"):
        mr.losses.z_loss(LOGITS.astype(np.int64))


def test_mixed_backends_array_api_strict(plan):
    # An array_api_strict x with a NumPy plan: one backend per call.
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="x is a array_api_strict"):
        mr.dispatch(xps.zeros((2, 5)), plan)


def test_mixed_backends_torch(plan):
    # A torch x with a NumPy plan, and a NumPy ye with a torch plan.
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"x is a torch\.Tensor but the plan holds numpy arrays"):
        mr.dispatch(torch.zeros((2, 5)), plan)
    torch_plan = mr.make_plan(mr.TopK(num_experts=4, k=2)(torch.asarray(LOGITS)))
    with pytest.raises(TypeError, match=r"ye is a numpy\.ndarray but the plan holds torch arrays"):
        mr.combine(np.zeros((4, 5), np.float32), torch_plan)


def test_mixed_devices_torch():
    # A tensor on another device than the plan (the meta device stands in for a GPU).
    torch = pytest.importorskip("torch")
    plan = mr.make_plan(mr.TopK(num_experts=4, k=2)(torch.asarray(LOGITS)))
    with pytest.raises(ValueError, match="x is on device meta but the plan is on cpu"):
        mr.dispatch(torch.zeros((2, 5), device="meta"), plan)


NONFINITE = [
    # NaN anywhere in the row.
    pytest.param(np.nan, id="nan"),
    # +inf: a softmax would be NaN.
    pytest.param(np.inf, id="plus-inf"),
    # Every entry -inf: nothing to route to.
    pytest.param(-np.inf, id="all-minus-inf"),
]


@pytest.mark.parametrize("bad_value", NONFINITE)
@pytest.mark.parametrize(
    "make_router",
    [
        pytest.param(lambda **kw: mr.TopK(num_experts=8, k=2, **kw), id="topk"),
        pytest.param(lambda **kw: mr.NullExperts(num_experts=4, num_null=4, k=2, **kw), id="null"),
        pytest.param(lambda **kw: mr.ExpertChoice(num_experts=8, **kw), id="expert-choice"),
    ],
)
def test_nonfinite_rows(backend, make_router, bad_value):
    # (32, 8) like the equivalence tests, so JAX reuses its compiled ops.
    logits = np.random.default_rng(15).standard_normal((32, 8)).astype(np.float32)
    if bad_value == -np.inf:
        logits[1] = -np.inf
    else:
        logits[1, 1] = bad_value
    logits = backend.asarray(logits)
    # strict=True raises on concrete values ...
    with pytest.raises(ValueError, match="1 non-finite row\\(s\\) and strict=True"):
        make_router(strict=True)(logits)
    # ... otherwise the row routes nowhere: zero weights, zero probabilities, zero output.
    routing = make_router()(logits)
    token_ids, weights = to_numpy(routing.token_ids), to_numpy(routing.weights)
    assert to_numpy(routing.finite_rows).tolist() == [True, False] + [True] * 30
    assert np.all(weights[token_ids == 1] == 0)
    assert np.all(to_numpy(routing.expert_ids)[token_ids == 1] == -1)
    assert np.all(to_numpy(routing.probs)[1] == 0)
    assert np.all(np.isfinite(weights)) and np.all(np.isfinite(to_numpy(routing.probs)))
    plan = mr.make_plan(routing)
    ones = backend.asarray(np.ones((plan.num_rows, 3), np.float32))
    y = to_numpy(mr.combine(ones, plan))
    assert np.all(y[1] == 0) and np.all(np.isfinite(y))
    # ... and stats count it; losses stay finite.
    assert int(to_numpy(mr.stats.summary(routing)["nonfinite_rows"])) == 1
    assert np.isfinite(float(to_numpy(mr.losses.load_balancing(routing))))
    assert np.isfinite(float(to_numpy(mr.losses.z_loss(logits))))
