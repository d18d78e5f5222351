"""Float64 in a scoped context, never globally: ``with enable_x64(): ...``."""

from typing import Any

import jax


def enable_x64() -> Any:
    """A context manager turning on float64 inside it only."""
    if callable(getattr(jax, "enable_x64", None)):  # jax >= 0.8: a config state, a context
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # older jax

    return legacy()
