"""pytest fixtures for backend tests; plugins reuse them with ``pytest_plugins``.

``backend`` runs a test once per :class:`~moerouter.testing.Backend`, skipping (with the reason)
those that cannot run here; ``xp`` is that backend's array namespace; ``use_backend`` switches the
registry between the agnostic path and the plugins' kernels for the rest of a test
(:func:`~moerouter.testing.use_backend`, undone at teardown).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moerouter.testing.backends import Backend
from moerouter.testing.switching import backend_switch

__all__ = ["backend", "use_backend", "xp"]


@pytest.fixture(params=list(Backend), ids=str)
def backend(request: pytest.FixtureRequest) -> Backend:
    reason = request.param.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def xp(backend: Backend) -> Any:
    return backend.namespace()


@pytest.fixture
def use_backend() -> Iterator[Callable[..., None]]:
    """``use_backend("reference")`` for the agnostic path, ``use_backend()`` for the kernels.

    Takes :func:`moerouter.testing.use_backend`'s arguments; the environment and the registry's
    cache are restored when the test ends.
    """
    with backend_switch() as switch:
        yield switch
