"""pytest fixtures for backend tests; plugins reuse them with ``pytest_plugins``.

``backend`` runs a test once per :class:`~moerouter.testing.Backend`, skipping (with the reason)
those that cannot run here; ``xp`` is that backend's array namespace.
"""

from __future__ import annotations

from typing import Any

import pytest

from moerouter.testing.backends import Backend


@pytest.fixture(params=list(Backend), ids=str)
def backend(request: pytest.FixtureRequest) -> Backend:
    reason = request.param.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def xp(backend: Backend) -> Any:
    return backend.namespace()
