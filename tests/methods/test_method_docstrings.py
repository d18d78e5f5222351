"""The docstring examples of the seed-paper modules run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    # Branch-Train-Merge.
    "moerouter.ensemble",
    # MC-SMoE (align_experts needs SciPy).
    "moerouter.merging",
    # MEMoE.
    "moerouter.policies.anchor",
    # LocMoE / LocMoE+.
    "moerouter.policies.locality",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    pytest.importorskip("array_api_strict")
    pytest.importorskip("scipy")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
