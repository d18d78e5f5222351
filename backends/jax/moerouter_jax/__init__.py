"""JAX backend plugin for moerouter.

Registers itself for ``jax.Array`` inputs (tracers included) and makes :class:`moerouter.Routing`
and :class:`moerouter.Plan` pytrees, so policies can be called inside and returned from
``jax.jit``. It provides no fast kernels yet: plan, dispatch and combine run on the agnostic
array-API path, which already supports ``jit``, ``grad`` and ``vmap``.
"""

from dataclasses import fields

import jax

from moerouter import BackendInfo, Plan, Routing, SoftRouting, _registry

__all__ = ["backend"]


# Python values, not arrays: they become static metadata of the pytree (Plan.num_valid is an array).
STATIC = frozenset(
    {"num_tokens", "num_experts", "layout", "slots", "num_groups", "slots_per_expert", "capacity"}
)


def _register_pytree(cls: type) -> None:
    names = [f.name for f in fields(cls)]
    static = [name for name in names if name in STATIC]
    data = [name for name in names if name not in STATIC]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=static)


for _cls in (Routing, Plan, SoftRouting):
    try:
        _register_pytree(_cls)
    except ValueError:  # already registered (module reloaded)
        pass

# Registered on import, so torch.compile/jax.jit never trace the registry's lazy import.
backend = _registry.register(
    BackendInfo(
        name="jax",
        array_library="jax",
        kernels={},
        description="JAX (agnostic path; fast kernels not yet provided)",
    )
)
