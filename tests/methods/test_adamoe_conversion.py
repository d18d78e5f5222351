"""moerouter.adamoe: the exact-conversion range, the routers it builds, the tiling, bad inputs.

The layers' bit-identity tests are in backends/torch/tests/test_nn.py and
backends/jax/tests/test_jax_layer.py / test_jax_nnx.py.
"""

from __future__ import annotations

import array_api_strict as xp
import numpy as np
import pytest

import moerouter as mr
from moerouter.adamoe import (
    drop_null_rows,
    exact_k_range,
    null_router,
    tile_null_rows,
    top_k_router,
)


@pytest.mark.parametrize(
    ("num_null", "k", "expected"),
    [(0, 2, (2, 2)), (8, 2, (3, 4)), (16, 2, (4, 6)), (16, 1, (1, 3))],
)
def test_exact_range(num_null, k, expected):
    assert exact_k_range(k, 8, num_null) == expected


@pytest.mark.parametrize(("num_null", "k_prime"), [(8, 3), (8, 4), (16, 4), (16, 6), (24, 5)])
def test_routing_in_the_range_keeps_the_top_k_real_experts(num_null, k_prime):
    logits = np.random.default_rng(num_null + k_prime).standard_normal((500, 8)).astype(np.float32)
    top2 = mr.TopK(8, k=2)
    expected = top2(logits)
    converted = null_router(top2, num_null=num_null, k=k_prime)(
        tile_null_rows(logits, num_null, axis=1)
    )
    ids = converted.expert_ids.reshape(500, k_prime)
    real = ids >= 0
    assert (real.sum(axis=1) == 2).all()
    np.testing.assert_array_equal(ids[real].reshape(500, 2), expected.expert_ids.reshape(500, 2))
    weights = converted.weights.reshape(500, k_prime)[real].reshape(500, 2)
    np.testing.assert_array_equal(weights, expected.weights.reshape(500, 2))


def test_tiling_and_dropping_on_a_strict_array():
    weight = xp.reshape(xp.arange(6, dtype=xp.float32), (3, 2))
    tiled = tile_null_rows(weight, 4)
    assert tiled.shape == (7, 2)
    assert xp.all(tiled[3:6, :] == weight) and xp.all(tiled[6, :] == weight[0, :])
    assert xp.all(drop_null_rows(tiled, 3) == weight)
    columns = tile_null_rows(xp.permute_dims(weight, (1, 0)), 3, axis=-1)
    assert xp.all(drop_null_rows(columns, 3, axis=1) == xp.permute_dims(weight, (1, 0)))
    assert tile_null_rows(weight, 0).shape == (3, 2)


def test_round_trip_of_routers():
    top2 = mr.TopK(8, k=2, strict=True)
    null = null_router(top2, num_null=16, k=4)
    assert null == mr.NullExperts(8, num_null=16, k=4, strict=True)
    assert top_k_router(null, k=2) == top2


BAD = [
    pytest.param(
        dict(router=mr.NullExperts(8, 8, 4), num_null=8, k=4), TypeError, "router", id="not-topk"
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=1, normalize=False), num_null=8, k=2),
        ValueError,
        "normalize",
        id="not-normalised",
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2, score="sigmoid"), num_null=8, k=4),
        ValueError,
        "score",
        id="sigmoid",
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2, capacity_factor=1.0), num_null=8, k=4),
        ValueError,
        "capacity_factor",
        id="capacity",
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2), num_null=8, k=1),
        ValueError,
        "k must be >= the top-k router's k = 2",
        id="k-below-k",
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2), num_null=4, k=3),
        ValueError,
        "num_null must be a multiple of num_experts = 8",
        id="not-divisible",
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2), num_null=16, k=7),
        ValueError,
        "k must be in [4, 6]",
        id="k-above-range",
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2), num_null=-8, k=4), ValueError, "num_null", id="negative-null"
    ),
    pytest.param(
        dict(router=mr.TopK(8, k=2), num_null=8, k=2.0), TypeError, "k must be an int", id="float-k"
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_conversion_names_the_parameter(kwargs, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        null_router(kwargs.pop("router"), **kwargs)


def test_bad_tiling_and_back_conversion():
    with pytest.raises(TypeError, match=r"router must be a moerouter\.NullExperts"):
        top_k_router(mr.TopK(8, k=2), k=2)
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        top_k_router(mr.NullExperts(8, 8, 4), k=9)
    with pytest.raises(TypeError, match="weight must be an array"):
        tile_null_rows([[1.0]], 2)
    with pytest.raises(ValueError, match="axis must be in"):
        tile_null_rows(np.ones((2, 3)), 2, axis=2)
    with pytest.raises(ValueError, match="no rows"):
        tile_null_rows(np.ones((0, 3)), 2)
    with pytest.raises(ValueError, match="num_experts must be <= the 2 rows"):
        drop_null_rows(np.ones((2, 3)), 3)
