"""Failure model: two arrays of one result share memory.

A ``Routing`` is plain data that a caller may edit in place (mask a token, drop an expert by
writing -1). If two of its fields were views of one buffer, that edit would silently change the
other field too: e.g. a fast path that knows every choice is routed must not hand out
``choice_ids`` itself as ``expert_ids``. Every policy call of the registry
(``public_calls.POLICIES``) runs on finite logits, where the fast paths apply, on the backends
whose arrays are mutable (NumPy, torch), through the plugin kernels and the agnostic path.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from public_calls import POLICIES, Inputs

import moerouter as mr
from moerouter.testing import Backend, use_backend

CALLS = {
    f"{name}{variant}": call
    for name, case in POLICIES.items()
    for variant, call in case.calls.items()
}


@pytest.fixture(params=["own kernels", "reference"])
def path(request):
    with use_backend("reference" if request.param == "reference" else "kernels"):
        yield request.param


def _shares_memory(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return np.shares_memory(a, b)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# Only mutable arrays: JAX and array-api-strict arrays cannot be edited through an alias.
@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_routing_fields_have_their_own_memory(name, backend, path):
    if (reason := backend.unavailable_reason()) is not None:
        pytest.skip(reason)
    routing = CALLS[name](Inputs(backend.asarray, backend.namespace()), (64,))
    if not isinstance(routing, mr.Routing):
        pytest.skip(f"{name} returns {type(routing).__name__}")
    fields = {
        field: value
        for field, value in vars(routing).items()
        if hasattr(value, "shape") and int(np.prod(value.shape)) > 0
    }
    for (first, a), (second, b) in itertools.combinations(fields.items(), 2):
        assert not _shares_memory(a, b), f"{name}: {first} and {second} share memory"
