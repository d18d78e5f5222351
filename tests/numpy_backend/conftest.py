"""Fixtures that switch between the NumPy kernels and the agnostic reference path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moerouter import _numpy_backend, _registry


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The registry caches the plugin per array library; every test starts and ends without it,
    # and without an inherited MOEROUTER_BACKEND or cache/thread settings.
    for name in ("MOEROUTER_BACKEND", "MOEROUTER_NUMPY_CACHE_MB", "MOEROUTER_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    _registry._loaded.clear()
    yield
    _registry._loaded.clear()
    _numpy_backend.clear_cache()


@pytest.fixture
def on_reference(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], Any]], Any]:
    """Run a callable with ``MOEROUTER_BACKEND=reference`` (the agnostic path), then restore."""

    def run(fn: Callable[[], Any]) -> Any:
        with monkeypatch.context() as patch:
            patch.setenv("MOEROUTER_BACKEND", "reference")
            _registry._loaded.clear()
            try:
                return fn()
            finally:
                _registry._loaded.clear()

    return run
