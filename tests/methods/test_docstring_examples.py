"""The Examples sections of the method modules run and print what they say (on array-api-strict)."""

from __future__ import annotations

import doctest
import importlib.util

import pytest

from moerouter import confidence, distillation, ensemble, merging, multitask
from moerouter.gates import locality as locality_gates
from moerouter.policies import anchor, locality

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
        # Branch-Train-Merge posteriors, priors and parameter averaging.
        pytest.param(ensemble, id="ensemble"),
        # MC-SMoE statistics, grouping, alignment (SciPy), merging, remapping, low rank.
        pytest.param(merging, id="merging"),
        # MEMoE anchor routing.
        pytest.param(anchor, id="anchor"),
        # LocMoE locality and LocMoE+ affinity routing.
        pytest.param(locality, id="locality"),
        # LocMoE's GrAP gate and LocMoE+'s affinity (gates/locality.py).
        pytest.param(locality_gates, id="gates.locality"),
    ],
)
def test_examples(module):
    if module is merging and importlib.util.find_spec("scipy") is None:
        pytest.skip("align_experts' example needs SciPy (an optional extra)")
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
