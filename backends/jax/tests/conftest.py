from collections.abc import Callable, Iterator

import pytest

from moerouter.testing.switching import backend_switch


@pytest.fixture
def use_backend() -> Iterator[Callable[..., None]]:
    """Call ``use_backend("reference")`` for the agnostic path, ``use_backend("jax")`` for ours.

    Starts on ours; the environment and the registry's cache are restored when the test ends.
    """
    with backend_switch() as switch:
        switch("jax")
        yield switch
