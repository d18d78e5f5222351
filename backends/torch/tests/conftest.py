from collections.abc import Callable, Iterator

import pytest

from moerouter.testing.switching import backend_switch


@pytest.fixture
def use_backend() -> Iterator[Callable[..., None]]:
    """Call ``use_backend("reference")`` for the agnostic path, ``use_backend("torch")`` for ours.

    The environment and the registry's cache are restored when the test ends. (The same fixture
    as ``moerouter.testing.fixtures``' one, defined here so that these tests run on their own.)
    """
    with backend_switch() as switch:
        yield switch
