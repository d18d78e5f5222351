import pytest

from moerouter import _registry


@pytest.fixture
def use_backend(monkeypatch):
    """Call ``use_backend("reference")`` for the agnostic path, ``use_backend("jax")`` for ours.

    The registry caches the loaded plugin per array library, so it is cleared on every switch.
    """

    def switch(name: str) -> None:
        if name == "reference":
            monkeypatch.setenv("MOEROUTER_BACKEND", "reference")
        else:
            monkeypatch.delenv("MOEROUTER_BACKEND", raising=False)
        _registry._loaded.clear()

    switch("jax")
    yield switch
    _registry._loaded.clear()
