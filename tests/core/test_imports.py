"""``import moerouter`` imports no framework (STYLE.md rule 1; array-api-compat's test)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "jax", "jaxlib", "cupy")

SCRIPTS = [
    # The package itself.
    pytest.param("import moerouter", id="import"),
    # Routing NumPy and array_api_strict arrays end to end loads only their (built-in) plugins.
    pytest.param(
        "import numpy as np, moerouter as mr\n"
        "r = mr.TopK(num_experts=4, k=2)(np.ones((3, 4), np.float32))\n"
        "p = mr.make_plan(r)\n"
        "mr.combine(mr.dispatch(np.ones((3, 2), np.float32), p), p)\n"
        "mr.losses.load_balancing(r); mr.stats.summary(r)\n"
        "try:\n"
        "    import array_api_strict as xps\n"
        "    mr.ExpertChoice(num_experts=4)(xps.ones((3, 4)))\n"
        "except ImportError:\n"
        "    pass",
        id="route-numpy",
    ),
    # The conformance kit is imported by plugins' tests: it must stay light too.
    pytest.param("import moerouter.testing", id="testing-kit"),
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_framework_imported(script):
    check = f"import sys\nbad = [m for m in {HEAVY!r} if m in sys.modules]\nprint(','.join(bad))"
    result = subprocess.run(
        [sys.executable, "-c", f"{script}\n{check}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported {result.stdout.strip()}"
