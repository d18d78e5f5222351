"""Failure model: bad or extreme input is refused by name, or handled as documented, never silently
turned into a wrong routing.

* **float64 logits beyond float32's range** (1e39): finite, so the row stays routable (saturated
  to the largest float32, as the policies document) rather than becoming inf and routing nowhere;
  ``strict=True`` says exactly that, not "non-finite".
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import Backend, to_numpy

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float64(backend: Backend) -> None:
    if backend is Backend.JAX:
        pytest.skip("JAX without x64 casts float64 to float32 in jnp.asarray, before moerouter")


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
