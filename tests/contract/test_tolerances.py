"""The default tolerances are earned: a naive float32 version stays within half of them.

The flash-attention rule: a kernel may stray from the float64 reference by at most twice what an
obvious same-precision implementation strays. If this test fails, the tolerance in
:mod:`moerouter.testing.asserts` is too tight for the inputs the suite uses, not the kernel wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from moerouter.testing import ROUTER_ATOL, ROUTER_RTOL, edge_case_logits


def naive_float32_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(
    ("num_columns", "scale"),
    [
        # The widest router the equivalence tests use, with typical logits.
        pytest.param(64, 2.0, id="wide"),
        # Large logit spreads: exp amplifies the rounding of the shifted argument.
        pytest.param(8, 8.0, id="spread"),
    ],
)
def test_naive_float32_softmax_within_half_tolerance(num_columns, scale):
    logits = edge_case_logits(4, 64, num_columns, seed=14, scale=scale)
    rows = logits.reshape(-1, num_columns)
    rows = rows[np.all(np.isfinite(rows), axis=-1)]
    exact = naive_float32_softmax(rows.astype(np.float64))
    naive = naive_float32_softmax(rows).astype(np.float64)
    assert np.all(np.abs(naive - exact) <= (ROUTER_ATOL + ROUTER_RTOL * np.abs(exact)) / 2)
