"""Fixtures that switch between the NumPy kernels and the agnostic reference path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moerouter import _numpy_backend
from moerouter.testing import use_backend


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Every test starts on the NumPy kernels with an empty registry cache, without inherited
    # cache/thread settings, and ends with the registry and the plan cache emptied.
    for name in ("MOEROUTER_NUMPY_CACHE_MB", "MOEROUTER_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    with use_backend():
        yield
    _numpy_backend.clear_cache()


@pytest.fixture
def on_reference() -> Callable[[Callable[[], Any]], Any]:
    """Run a callable on the agnostic path (``use_backend("reference")``), then switch back."""

    def run(fn: Callable[[], Any]) -> Any:
        with use_backend("reference"):
            return fn()

    return run
