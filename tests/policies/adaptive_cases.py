"""What the adaptive-policy tests share: backends, traced runs, meta placement, routing fields."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import settings

from moerouter.testing import Backend, assert_routing_equal, to_numpy

# Property runs: modest example counts, no deadline (a loaded 2-core machine), no database.
PROPERTY = settings(max_examples=30, deadline=None, database=None)

# NumPy (its own plugin) and array_api_strict (the agnostic path) need no framework.
LIGHT_BACKENDS = [
    pytest.param(Backend.NUMPY, id="numpy"),
    pytest.param(Backend.ARRAY_API_STRICT, id="array_api_strict"),
]


def array_fields(routing):
    """Every array field of a Routing, as NumPy, by name."""
    return {
        f.name: to_numpy(getattr(routing, f.name))
        for f in dataclasses.fields(routing)
        if not isinstance(getattr(routing, f.name), int | str | type(None))
    }


def same_routing(actual, expected):
    """Two Routings of (possibly) different backends are one decision."""
    assert_routing_equal(actual, expected)
    assert actual.capacity == expected.capacity


# torch.compile traces array_api_compat's lru_cache-wrapped helpers; dynamo warns about that.
COMPILE_WARNING = pytest.mark.filterwarnings(
    "ignore:Dynamo detected a call to a `functools.lru_cache`"
)


def jax_jitted(call, *arrays, static=()):
    """``call(*arrays)`` under ``jax.jit`` (the reference path), and eagerly."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")  # makes Routing a pytree
    jarrays = [jax.numpy.asarray(a) for a in arrays]
    return jax.jit(call)(*jarrays), call(*jarrays)


def torch_compiled(call, *arrays):
    """``call(*arrays)`` under ``torch.compile(fullgraph=True)`` (aot_eager), and eagerly."""
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    tarrays = [torch.asarray(np.asarray(a)) for a in arrays]
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    return compiled(*tarrays), call(*tarrays)


def assert_on_meta(routing):
    """Every array of a routing computed from torch ``meta`` tensors is on ``meta``."""
    for f in dataclasses.fields(routing):
        value = getattr(routing, f.name)
        if hasattr(value, "device"):
            assert str(value.device) == "meta", f"{f.name} is on {value.device}"
