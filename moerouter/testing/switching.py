"""Switch the whole process between the agnostic path, the plugins' kernels and unverified kernels.

Tests compare a plugin's kernels with the agnostic path by running the same public call twice,
once under each. The switch is two environment variables the registry reads
(``MOEROUTER_BACKEND``, ``MOEROUTER_UNVERIFIED_KERNELS``) plus the registry's cache of loaded
plugins; :func:`use_backend` sets the first two and empties the cache, and on exit puts the
variables back and empties the cache again (plugins are then looked up afresh, from
``sys.modules`` when already imported), so no test needs to know how the registry stores what it
loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

from moerouter import _registry

__all__ = ["backend_switch", "use_backend"]

_BACKEND_VARIABLE = "MOEROUTER_BACKEND"

#: The names :func:`use_backend` takes besides a plugin's name.
REFERENCE = "reference"
KERNELS = "kernels"


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def use_backend(
    name: str = KERNELS, *, unverified: str | Iterable[str] | None = None
) -> Iterator[None]:
    """Run the public functions on the agnostic path or on the plugins' kernels while inside.

    Parameters
    ----------
    name : str
        ``"reference"``: every call takes the agnostic array-API path
        (``MOEROUTER_BACKEND=reference``). ``"kernels"`` (the default): each array's plugin
        kernels, chosen per call from the array's type, as in normal use. A plugin's name
        (``"torch"``, ``"jax"``, ``"numpy"``, ...): the same, but that plugin is asked for by name,
        so it raises if it fails to load instead of falling back.
    unverified : str or iterable of str, optional
        Kernel sets that have not yet passed on hardware to switch on anyway
        (``"torch-triton"``, ``("jax-pallas", "cupy-cuda")``, or ``"all"``), as
        ``MOEROUTER_UNVERIFIED_KERNELS`` does; an empty iterable switches them all off. ``None``
        leaves the variable as it is (``tools/gpu-check`` sets it for a whole run).

    Notes
    -----
    The variables it set are restored on exit, also when the block raises, and the registry's
    cache of loaded plugins is emptied on entry and on exit (``moerouter._registry.reset()``).
    A function already traced by ``jax.jit`` or ``torch.compile`` keeps the path it was traced
    with. The switch is process-wide: do not use it from several threads.

    Examples
    --------
    >>> import numpy as np
    >>> import moerouter as mr
    >>> from moerouter.testing import use_backend
    >>> logits = np.random.default_rng(0).standard_normal((6, 4), dtype=np.float32)
    >>> with use_backend("reference"):
    ...     expected = mr.TopK(num_experts=4, k=2)(logits)
    >>> routing = mr.TopK(num_experts=4, k=2)(logits)
    >>> bool((routing.expert_ids == expected.expert_ids).all())
    True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"use_backend: name must be a non-empty string, got {name!r}")
    if isinstance(unverified, str):
        unverified = (unverified,)
    settings = {_BACKEND_VARIABLE: None if name == KERNELS else name}
    if unverified is not None:  # otherwise left alone, and not restored either
        settings[_registry.UNVERIFIED_KERNELS_VARIABLE] = ",".join(unverified) or None
    saved = {variable: os.environ.get(variable) for variable in settings}
    for variable, value in settings.items():
        _set(variable, value)
    _registry.reset()
    try:
        yield
    finally:
        for variable, value in saved.items():
            _set(variable, value)
        _registry.reset()


@contextmanager
def backend_switch() -> Iterator[Callable[..., None]]:
    """A ``switch(name="kernels", *, unverified=None)`` callable, undone when the block ends.

    Each call leaves the previous switch and enters :func:`~moerouter.testing.use_backend` with
    its arguments, so a test can go back and forth; a conftest builds its own fixture on it (a
    plugin's tests starting on its kernels, say).
    """
    with ExitStack() as stack:

        def switch(name: str = KERNELS, *, unverified: str | Iterable[str] | None = None) -> None:
            stack.close()
            stack.enter_context(use_backend(name, unverified=unverified))

        yield switch
