"""Failure model: bad or extreme input is refused by name, or handled as documented, never silently
turned into a wrong routing.

Three kinds of input a hostile (or merely careless) user sends, each with the rule it must meet:

* **A non-finite selection bias** (``DeepSeekTopK``'s expert bias, ``update_expert_bias``'s
  inputs): a ValueError naming the parameter whenever the values can be read; under ``jax.jit``
  the documented fallback (a NaN entry excludes its expert).
* **float64 logits beyond float32's range** (1e39): finite, so the row stays routable (saturated
  to the largest float32, as the policies document) rather than becoming inf and routing nowhere;
  ``strict=True`` says exactly that, not "non-finite".
* **Hyper-parameters of the wrong type**: a flag must be a bool (``strict="no"`` is truthy) and a
  count any integer ``operator.index`` takes (``numpy.int64`` from a config or a shape), never a
  bool; every public policy's fields are checked, from their annotations.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from public_calls import POLICIES, public_policies

import moerouter as mr
from moerouter.testing import Backend, to_numpy

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float64(backend: Backend) -> None:
    if backend is Backend.JAX:
        pytest.skip("JAX without x64 casts float64 to float32 in jnp.asarray, before moerouter")


# --------------------------------------------------------------------------------------------
# DeepSeek's expert bias and its update.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        # An all-NaN bias used to route every token nowhere while finite_rows said all fine.
        pytest.param([np.nan] * 4, id="all-nan"),
        # One NaN silently removed its expert from every selection.
        pytest.param([0.0, np.nan, 0.0, 0.0], id="one-nan"),
        # +inf forces its expert into every top k.
        pytest.param([0.0, 0.0, np.inf, 0.0], id="plus-inf"),
        # -inf removes its expert; a mask belongs in the logits, not the balancing bias.
        pytest.param([-np.inf, 0.0, 0.0, 0.0], id="minus-inf"),
    ],
)
def test_deepseek_non_finite_bias_is_an_error(backend, bad):
    router = mr.DeepSeekTopK(num_experts=4, k=2)
    logits = backend.asarray(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"bias must be finite, got [0-9]+ non-finite entr"):
        router(logits, backend.asarray(np.asarray(bad, np.float32)))


def test_deepseek_bias_beyond_float32_is_not_called_non_finite(backend):
    # A finite float64 bias of 1e39 saturates like logits do: expert 3 wins every selection.
    _float64(backend)
    router = mr.DeepSeekTopK(num_experts=4, k=1)
    logits = backend.asarray(np.random.default_rng(0).standard_normal((5, 4)))
    bias = backend.asarray(np.asarray([0.0, 0.0, 0.0, 1e39]))
    assert to_numpy(router(logits, bias).expert_ids).tolist() == [3] * 5


def test_deepseek_nan_bias_under_jit_is_the_documented_fallback():
    # Traced values cannot be checked; the docstring says what happens instead.
    jax = pytest.importorskip("jax")
    router = mr.DeepSeekTopK(num_experts=4, k=2)
    logits = jax.numpy.asarray(np.random.default_rng(1).standard_normal((6, 4)), np.float32)
    route = jax.jit(lambda logits, bias: router(logits, bias).expert_ids)
    one_nan = np.asarray([np.nan, 0.0, 0.0, 0.0], np.float32)
    experts = np.asarray(route(logits, jax.numpy.asarray(one_nan)))
    assert np.all((experts != 0) & (experts >= 0))  # expert 0 excluded, the others still routed
    all_nan = np.full(4, np.nan, np.float32)
    assert np.all(np.asarray(route(logits, jax.numpy.asarray(all_nan))) == -1)


@pytest.mark.parametrize(
    ("bias", "counts", "error", "match"),
    [
        # A NaN bias would stay NaN for ever.
        pytest.param([np.nan, 0.0], [1, 2], ValueError, "bias must be finite", id="nan-bias"),
        # A NaN count turns the whole bias row NaN through the mean.
        pytest.param(
            [0.0, 0.0],
            [np.nan, 1.0],
            ValueError,
            "tokens_per_expert must be finite",
            id="nan-count",
        ),
        # A count is never negative: a sign error upstream, caught here.
        pytest.param(
            [0.0, 0.0],
            [-1.0, 1.0],
            ValueError,
            "tokens_per_expert must be .* >= 0",
            id="negative-count",
        ),
        # Booleans are not counts.
        pytest.param(
            [0.0, 0.0], [True, False], TypeError, "tokens_per_expert must be", id="bool-count"
        ),
    ],
)
def test_update_expert_bias_inputs(backend, bias, counts, error, match):
    with pytest.raises(error, match=match):
        mr.update_expert_bias(
            backend.asarray(np.asarray(bias, np.float32)), backend.asarray(np.asarray(counts)), 0.1
        )


# --------------------------------------------------------------------------------------------
# float64 logits beyond float32's range.
# --------------------------------------------------------------------------------------------

BEYOND = [
    # Softmax token choice.
    pytest.param(lambda **kw: mr.TopK(num_experts=3, k=1, **kw), True, id="topk"),
    # Sigmoid scores: 1e39 saturates to a score of 1, not NaN. Without -1e39: NumPy warns on
    # the exp overflow of today's 1 / (1 + exp(-x)), which issue 23 replaces by a stable form.
    pytest.param(
        lambda **kw: mr.TopK(num_experts=3, k=1, score="sigmoid", **kw), False, id="sigmoid"
    ),
    # Expert choice ranks probabilities across tokens.
    pytest.param(
        lambda **kw: mr.ExpertChoice(num_experts=3, capacity_factor=3.0, **kw), True, id="ec"
    ),
    # Transport: the logits are scaled by 1 / epsilon before Sinkhorn.
    pytest.param(lambda **kw: mr.SinkhornTokenChoice(num_experts=3, **kw), True, id="sinkhorn"),
]


def _beyond_logits(negative: bool = True) -> np.ndarray:
    logits = np.random.default_rng(2).standard_normal((4, 3))
    logits[3, 1] = 1e39  # finite in float64, inf in float32
    if negative:
        logits[2, 0] = -1e39  # must not become a -inf mask
    return logits


@pytest.mark.parametrize(("make_router", "negative"), BEYOND)
def test_float64_beyond_float32_stays_routable(backend, make_router, negative):
    _float64(backend)
    logits = _beyond_logits(negative)
    routing = make_router()(backend.asarray(logits))
    assert to_numpy(routing.finite_rows).all(), "a finite row was called non-finite"
    experts, tokens = to_numpy(routing.expert_ids), to_numpy(routing.token_ids)
    # Row 3's 1e39 is its largest logit by far: expert 1 takes it.
    assert 1 in experts[tokens == 3].tolist()
    assert np.all(np.isfinite(to_numpy(routing.weights)))
    assert np.all(np.isfinite(to_numpy(routing.probs)))


def test_saturation_keeps_a_huge_negative_logit_routable(backend):
    # -1e39 is a very bad score, not a mask: with k = 3 all three experts are real.
    _float64(backend)
    logits = backend.asarray(np.asarray([[-1e39, 0.0, 1.0]]))
    routing = mr.TopK(num_experts=3, k=3)(logits)
    assert sorted(to_numpy(routing.expert_ids).tolist()) == [0, 1, 2]


@pytest.mark.parametrize(("make_router", "negative"), BEYOND)
def test_strict_says_beyond_float32_not_non_finite(backend, make_router, negative):
    _float64(backend)
    with pytest.raises(ValueError) as raised:
        make_router(strict=True)(backend.asarray(_beyond_logits(negative)))
    message = str(raised.value)
    assert "non-finite" not in message
    assert f"{1 + negative} row(s) with finite values outside float32 range" in message
    assert ("row 2 holds -1e+39" if negative else "row 3 holds 1e+39") in message


@pytest.mark.parametrize(
    ("row", "cause"),
    [
        pytest.param([np.nan, 0.0, 0.0], "holds NaN", id="nan"),
        pytest.param([0.0, np.inf, 0.0], "holds \\+inf", id="plus-inf"),
        pytest.param([-np.inf] * 3, "is all -inf", id="all-minus-inf"),
    ],
)
def test_strict_names_the_row_and_the_cause(backend, row, cause):
    logits = np.zeros((2, 3, 3), np.float32)
    logits[1, 2] = row
    with pytest.raises(
        ValueError, match=f"1 non-finite row\\(s\\) and strict=True: row \\(1, 2\\) {cause}"
    ):
        mr.TopK(num_experts=3, k=1, strict=True)(backend.asarray(logits))


# --------------------------------------------------------------------------------------------
# Flags and counts of every public policy.
# --------------------------------------------------------------------------------------------

# The smallest constructor arguments of every public policy, from the policy registry.
POLICY_ARGS = {name: case.args for name, case in POLICIES.items()}


def _fields(kind: str) -> list:
    """(policy name, field name) for every init field annotated ``kind``."""
    found = []
    for name in POLICY_ARGS:
        for field in dataclasses.fields(getattr(mr.policies, name)):
            if field.init and field.type == kind:
                found.append(pytest.param(name, field.name, id=f"{name}.{field.name}"))
    return found


def test_every_policy_is_listed():
    # A new policy must join public_calls.POLICIES (its one entry feeds every reliability test).
    assert public_policies() == set(POLICY_ARGS)


def test_the_field_lists_are_not_empty():
    # Guards the introspection below against an annotation style it does not read.
    assert len(_fields("bool")) >= 15 and len(_fields("int")) >= 25


def _value(name: str, field: str) -> object:
    default = getattr(mr.policies, name).__dataclass_fields__[field].default
    return POLICY_ARGS[name].get(field, default)


@pytest.mark.parametrize(("name", "field"), _fields("bool"))
@pytest.mark.parametrize("bad", ["no", 1, None], ids=["str", "int", "none"])
def test_flags_must_be_bools(name, field, bad):
    # strict="no" used to turn strict on; normalize="no" normalised.
    with pytest.raises(TypeError, match=f"{field} must be a bool, got {type(bad).__name__}"):
        getattr(mr.policies, name)(**{**POLICY_ARGS[name], field: bad})


@pytest.mark.parametrize(("name", "field"), _fields("bool"))
def test_numpy_bools_are_flags(name, field):
    value = bool(_value(name, field))
    policy = getattr(mr.policies, name)(**{**POLICY_ARGS[name], field: np.bool_(value)})
    assert type(getattr(policy, field)) is bool and getattr(policy, field) is value


@pytest.mark.parametrize(("name", "field"), _fields("int") + _fields("int | None"))
@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint8, np.asarray], ids=str)
def test_counts_take_any_integer(name, field, integer):
    # "k must be an int, got int64": NumPy integers (and 0-d integer arrays) are integers.
    value = _value(name, field)
    if value is None:
        value = 1
    cls = getattr(mr.policies, name)
    policy = cls(**{**POLICY_ARGS[name], field: integer(value)})
    assert type(getattr(policy, field)) is int  # stored exact: sizes computed from it stay int
    plain = cls(**{**POLICY_ARGS[name], field: value})
    for other in dataclasses.fields(cls):
        if other.init:  # derived fields may hold arrays, which do not compare to one bool
            assert getattr(policy, other.name) == getattr(plain, other.name)


@pytest.mark.parametrize(("name", "field"), _fields("int"))
@pytest.mark.parametrize("bad", [True, 2.0, "2"], ids=["bool", "float", "str"])
def test_counts_refuse_non_integers(name, field, bad):
    shown = "bool" if bad is True else type(bad).__name__
    with pytest.raises(TypeError, match=f"{field} must be an int, got {shown}"):
        getattr(mr.policies, name)(**{**POLICY_ARGS[name], field: bad})


def test_call_time_k_takes_any_integer(backend):
    logits = backend.asarray(np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32))
    for router in (mr.TopK(4, 2), mr.NullExperts(2, 2, 2), mr.DeepSeekTopK(4, 2)):
        expected = to_numpy(router(logits, k=1).expert_ids)
        np.testing.assert_array_equal(to_numpy(router(logits, k=np.int64(1)).expert_ids), expected)
        with pytest.raises(TypeError, match="k must be an int, got bool"):
            router(logits, k=True)


def test_capacity_factor_takes_numpy_numbers():
    # float32 and int64 are real numbers too (numbers.Real).
    assert mr.TopK(4, 1, capacity_factor=np.float32(1.5)).capacity_factor == 1.5
    assert mr.ExpertChoice(4, capacity_factor=np.int64(2)).capacity(8) == 4


@pytest.mark.parametrize(
    "call",
    [
        # Each of these had its own isinstance(int) check before the shared one.
        pytest.param(lambda i: mr.random_hash_table(i(6), i(3), seed=i(0), k=i(2)), id="hash"),
        pytest.param(
            lambda i: mr.k_schedule(
                i(5),
                mode="multi_step_increase",
                k_min=i(1),
                k_max=i(4),
                total_steps=i(10),
                milestones=(i(1), i(2), i(4)),
            ),
            id="k-schedule",
        ),
        pytest.param(
            lambda i: to_numpy(
                mr.stats.processed_by_at_least(
                    mr.TopK(4, 2)(np.zeros((3, 4), np.float32)), thresholds=[i(0), i(2)]
                )
            ),
            id="stats-thresholds",
        ),
    ],
)
def test_functions_take_any_integer(call):
    np.testing.assert_array_equal(np.asarray(call(np.int64)), np.asarray(call(int)))


def test_make_plan_flag_must_be_a_bool():
    routing = mr.TopK(4, 1, capacity_factor=1.0)(np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="pad_to_capacity must be a bool, got str"):
        mr.make_plan(routing, pad_to_capacity="no")
    assert mr.make_plan(routing, pad_to_capacity=np.True_).capacity == 1
