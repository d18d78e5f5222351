"""Assertions for conformance tests: compare routings and plans across backends and references.

Tolerances
----------
Router math runs in float32. Against the float64 references in :mod:`moerouter.testing.reference`
a correct float32 implementation strays by rounding only:

* a softmax probability over ``n`` columns picks up one rounding in the subtraction of the row
  maximum (amplified by ``exp`` to ``|l - max| * u``), one in ``exp``, ``n`` in the sum and one in
  the division, so its relative error is at most ``(n + 2 + max|l - max|) * u`` with
  ``u = 2**-24``. For the test inputs (``n <= 64`` columns, logit spreads below 30) that is
  below ``100 u = 6e-6``; :data:`ROUTER_RTOL` is ``2**-16`` (1.5e-5), the flash-attention
  rule's factor of two over the worst naive same-precision error with a little headroom. A
  test (``tests/contract/test_tolerances.py``) checks that a naive float32 NumPy softmax indeed
  stays within half of it.
* :data:`ROUTER_ATOL` (``2**-24``) covers probabilities so small that their relative error is
  dominated by float32 underflow.

Routing *decisions* (integer fields) are compared exactly: they must be identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference import (
    PLAN_ARRAYS,
    ROUTING_ARRAYS,
    ROUTING_STATICS,
    as_dict,
)

__all__ = [
    "ROUTER_ATOL",
    "ROUTER_RTOL",
    "assert_close",
    "assert_plan_equal",
    "assert_plan_valid",
    "assert_routing_equal",
]

ROUTER_RTOL = 2.0**-16
ROUTER_ATOL = 2.0**-24

_INTEGER_FIELDS = ("token_ids", "expert_ids", "choice_ids", "finite_rows")
_FLOAT_FIELDS = ("weights", "probs")
_ROUTING_DTYPES = {
    "token_ids": "int32",
    "expert_ids": "int32",
    "choice_ids": "int32",
    "finite_rows": "bool",
    "weights": "float32",
    "probs": "float32",
}


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def assert_equal(actual: Any, expected: Any, name: str) -> None:
    """Exact equality of two arrays (shape and values), naming the first differing index."""
    actual, expected = np.asarray(to_numpy(actual)), np.asarray(to_numpy(expected))
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != expected {expected.shape}")
    differ = actual != expected
    if np.any(differ):
        index = _first_index(differ)
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {differ.size} entries differ; first at index {index}: "
            f"{actual[index]!r} != expected {expected[index]!r}"
        )


def assert_close(
    actual: Any, expected: Any, name: str, *, rtol: float = ROUTER_RTOL, atol: float = ROUTER_ATOL
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, NaN equal to NaN.

    Parameters
    ----------
    actual, expected : array
        Any backend, or NumPy; compared in float64.
    name : str
        Named in the failure message, with the first failing index.
    rtol, atol : float
        Relative and absolute tolerance.
    """
    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    expected = np.asarray(to_numpy(expected), dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != expected {expected.shape}")
    both_nan = np.isnan(actual) & np.isnan(expected)
    with np.errstate(invalid="ignore"):
        bad = ~both_nan & ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    bad &= ~(actual == expected)  # equal infinities
    if np.any(bad):
        index = _first_index(bad)
        error = np.abs(actual - expected)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} entries out of tolerance (rtol={rtol:g}, "
            f"atol={atol:g}); first at index {index}: {actual[index]!r} != expected "
            f"{expected[index]!r} (largest error {np.nanmax(error):.3g})"
        )


def assert_routing_equal(
    actual: Any, expected: Any, *, rtol: float = ROUTER_RTOL, atol: float = ROUTER_ATOL
) -> None:
    """Assert two routings are the same decision: integers identical, floats within tolerance.

    Parameters
    ----------
    actual, expected : Routing or dict
        :class:`moerouter.Routing` of any backend, or dicts from
        :mod:`moerouter.testing.reference`. A ``Routing`` must also have the contract's dtypes
        (int32 indices, float32 ``weights`` and ``probs``, bool ``finite_rows``).
    rtol, atol : float
        For ``weights`` and ``probs``; the defaults are derived in this module's docstring.

    Raises
    ------
    AssertionError
        Naming the field and the first mismatching index.
    """
    for obj in (actual, expected):
        if not isinstance(obj, dict):
            for name, dtype in _ROUTING_DTYPES.items():
                found = to_numpy(getattr(obj, name)).dtype
                if found != np.dtype(dtype):
                    raise AssertionError(f"{name}: dtype {found}, the contract says {dtype}")
    got = as_dict(actual, ROUTING_ARRAYS, ROUTING_STATICS)
    want = as_dict(expected, ROUTING_ARRAYS, ROUTING_STATICS)
    for name in ROUTING_STATICS:
        if got[name] != want[name]:
            raise AssertionError(f"{name}: {got[name]!r} != expected {want[name]!r}")
    for name in _INTEGER_FIELDS:
        assert_equal(got[name], want[name], name)
    for name in _FLOAT_FIELDS:
        assert_close(got[name], want[name], name, rtol=rtol, atol=atol)
    dead = got["expert_ids"] < 0
    if np.any(got["weights"][dead] != 0):
        index = _first_index(dead & (got["weights"] != 0))
        raise AssertionError(f"weights: nonzero weight at index {index} where expert_ids == -1")


def assert_plan_equal(
    actual: Any, expected: Any, *, rtol: float = ROUTER_RTOL, atol: float = ROUTER_ATOL
) -> None:
    """Assert two plans agree: every integer array identical, ``combine_weights`` close.

    Parameters
    ----------
    actual, expected : Plan or dict
        :class:`moerouter.Plan` of any backend, or a dict from
        :func:`~moerouter.testing.reference.reference_make_plan`.
    rtol, atol : float
        For ``combine_weights``.
    """
    got = as_dict(actual, PLAN_ARRAYS, ("num_tokens", "num_experts"))
    want = as_dict(expected, PLAN_ARRAYS, ("num_tokens", "num_experts"))
    for name in ("num_tokens", "num_experts"):
        if got[name] != want[name]:
            raise AssertionError(f"{name}: {got[name]!r} != expected {want[name]!r}")
    for name in PLAN_ARRAYS:
        if name == "combine_weights":
            assert_close(got[name], want[name], name, rtol=rtol, atol=atol)
        else:
            assert_equal(got[name], want[name], name)


def assert_plan_valid(plan: Any, routing: Any) -> None:
    """Assert the invariants every :class:`moerouter.Plan` must satisfy for its routing.

    * ``order`` is a permutation of ``range(R)`` and ``inverse`` is its inverse;
    * ``group_sizes`` sum to ``num_valid`` and equal the per-expert counts of ``expert_ids``;
    * dispatch rows are grouped by expert in ascending order, stable (assignment order) inside an
      expert, followed by the assignments of no expert (still in assignment order);
    * ``source_tokens`` is ``token_ids[order]``;
    * every ``combine_rows`` entry points back to an assignment of that token, with its weight,
      each real assignment of a token appears exactly once, and padding is -1 with weight 0.

    Parameters
    ----------
    plan : Plan or dict
    routing : Routing or dict
        The routing the plan was made from.

    Raises
    ------
    AssertionError
        Naming the broken invariant and where it breaks.
    """
    p = as_dict(plan, PLAN_ARRAYS, ("num_tokens", "num_experts"))
    r = as_dict(routing, ROUTING_ARRAYS, ROUTING_STATICS)
    if not isinstance(plan, dict):
        for name in PLAN_ARRAYS:
            want = "float32" if name == "combine_weights" else "int32"
            if p[name].dtype != np.dtype(want):
                raise AssertionError(
                    f"plan.{name}: dtype {p[name].dtype}, the contract says {want}"
                )
    order, inverse = p["order"].astype(np.int64), p["inverse"].astype(np.int64)
    expert_ids, token_ids = r["expert_ids"].astype(np.int64), r["token_ids"].astype(np.int64)
    num_rows, num_experts = expert_ids.shape[0], r["num_experts"]
    fan_in = r["slots"] if r["layout"] == "token" else num_experts

    if order.shape != (num_rows,) or not np.array_equal(np.sort(order), np.arange(num_rows)):
        raise AssertionError(f"order is not a permutation of range({num_rows})")
    if inverse.shape != (num_rows,) or not np.array_equal(order[inverse], np.arange(num_rows)):
        bad = np.flatnonzero(order[inverse] != np.arange(num_rows))
        raise AssertionError(f"inverse is not the inverse of order; first at index {bad[:1]}")
    counts = np.array([(expert_ids == e).sum() for e in range(num_experts)])
    assert_equal(p["group_sizes"], counts, "group_sizes (vs expert_ids counts)")
    num_valid = int(p["num_valid"])
    if num_valid != int(counts.sum()):
        raise AssertionError(f"num_valid = {num_valid} but group_sizes sum to {counts.sum()}")
    key = np.where(expert_ids >= 0, expert_ids, num_experts)[order]
    if np.any(np.diff(key) < 0):
        raise AssertionError(f"dispatch rows not grouped by ascending expert: {key.tolist()}")
    same_group = np.diff(key) == 0
    if np.any(np.diff(order)[same_group] <= 0):
        index = int(np.flatnonzero(same_group & (np.diff(order) <= 0))[0])
        raise AssertionError(f"order is not stable inside expert {key[index]} at row {index}")
    assert_equal(p["source_tokens"], token_ids[order], "source_tokens (vs token_ids[order])")

    rows, weights = p["combine_rows"].astype(np.int64), p["combine_weights"]
    if rows.shape != (r["num_tokens"], fan_in):
        expected_shape = (r["num_tokens"], fan_in)
        raise AssertionError(f"combine_rows shape {rows.shape}, expected {expected_shape}")
    seen = np.zeros(num_rows, bool)
    for t, f in zip(*np.nonzero(rows >= 0), strict=True):
        row = rows[t, f]
        if row >= num_valid:
            raise AssertionError(f"combine_rows[{t}, {f}] = {row} is past num_valid = {num_valid}")
        assignment = order[row]
        if token_ids[assignment] != t:
            raise AssertionError(
                f"combine_rows[{t}, {f}] reads row {row}, an assignment of token "
                f"{token_ids[assignment]}"
            )
        if seen[row]:
            raise AssertionError(f"combine_rows reads dispatch row {row} twice")
        seen[row] = True
        assert_close(weights[t, f], r["weights"][assignment], f"combine_weights[{t}, {f}]")
    if not np.all(seen[:num_valid]):
        row = int(np.flatnonzero(~seen[:num_valid])[0])
        raise AssertionError(f"dispatch row {row} (a real assignment) is never combined")
    if np.any(weights[rows < 0] != 0):
        raise AssertionError("combine_weights is nonzero where combine_rows is -1")
    for t in range(r["num_tokens"]):
        present = rows[t][rows[t] >= 0]
        if np.any(np.diff(order[present]) <= 0):
            raise AssertionError(f"combine_rows[{t}] is not in assignment order")
