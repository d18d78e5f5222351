"""Settings shared by every test run of the repository (``tests/`` and ``backends/``)."""

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a machine that runs only the example-based tests (tools/gpu-check)
    settings = None

if settings is not None:
    # CI is a loaded 2-core machine: no deadlines and no "too slow" health check, and the same
    # examples on every run, so that a property failure reproduces instead of flickering.
    # HYPOTHESIS_PROFILE=explore draws new examples each run (for a local search).
    settings.register_profile(
        "ci",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
        database=None,
    )
    settings.register_profile("explore", deadline=None, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
