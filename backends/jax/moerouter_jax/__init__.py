"""JAX backend plugin for moerouter.

Registers itself for ``jax.Array`` inputs (tracers included) and makes :class:`moerouter.Routing`
and :class:`moerouter.Plan` pytrees, so policies can be called inside and returned from
``jax.jit``. It provides no fast kernels yet: plan, dispatch and combine run on the agnostic
array-API path, which already supports ``jit``, ``grad`` and ``vmap``.
"""

from dataclasses import fields

import jax

from moerouter import BackendInfo, Plan, Routing

__all__ = ["backend"]


STATIC = ("layout", "slots")  # besides the num_* sizes: Python values, not arrays


def _register_pytree(cls: type) -> None:
    static = [
        f.name for f in fields(cls) if f.name.startswith("num_") or f.name in ("layout", "slots")
    ]
    data = [f.name for f in fields(cls) if f.name not in static]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=static)


for _cls in (Routing, Plan):
    try:
        _register_pytree(_cls)
    except ValueError:  # already registered (module reloaded)
        pass

backend = BackendInfo(
    name="jax",
    array_library="jax",
    kernels={},
    description="JAX (agnostic path; fast kernels not yet provided)",
)
