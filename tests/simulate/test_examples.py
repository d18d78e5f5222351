"""The Examples sections of traces, workloads and simulate run and print what they say."""

from __future__ import annotations

import doctest

import pytest

from moerouter import simulate, workloads
from moerouter.simulate import _model, _topology
from moerouter.traces import _recording

pytest.importorskip("array_api_strict")


@pytest.mark.parametrize(
    "module",
    [
        # record / replay with traced policies.
        # (doctest finds only the functions defined in a module: the part of the package that
        # defines them).
        pytest.param(_recording, id="traces._recording"),
        # Every generator, from_spec.
        pytest.param(workloads, id="workloads"),
        # The package example (a Zipf workload through top-2).
        pytest.param(simulate, id="simulate"),
        # place_experts, then run.
        pytest.param(_topology, id="simulate._topology"),
        pytest.param(_model, id="simulate._model"),
    ],
)
def test_examples(module):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
