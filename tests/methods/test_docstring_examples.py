"""The Examples sections of the method modules run and print what they say (on array-api-strict)."""

from __future__ import annotations

import doctest

import pytest

from moerouter import confidence, distillation, multitask

pytest.importorskip("array_api_strict")


@pytest.mark.parametrize(
    "module",
    [
        # Mowst: dispersion, confidences, losses, inference rules.
        pytest.param(confidence, id="confidence"),
        # Dual-head distillation losses and gradient alignment.
        pytest.param(distillation, id="distillation"),
        # HoME gates, helpers and diagnostics.
        pytest.param(multitask, id="multitask"),
    ],
)
def test_examples(module):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
