"""JAX backend plugin for moerouter: gather-only plan, dispatch and combine, grouped experts.

Registers itself for ``jax.Array`` inputs (tracers included) and makes :class:`moerouter.Routing`,
:class:`moerouter.Plan` and :class:`moerouter.SoftRouting` pytrees, so policies can be called
inside and returned from ``jax.jit``. Its kernels are ``jax.custom_vjp`` functions whose forward
and backward passes are gathers and fixed-order reduces (no scatter-add), with Pallas kernels on
GPU once their kernel set ``jax-pallas`` is on (it is off until it has passed on a real GPU;
``MOEROUTER_UNVERIFIED_KERNELS=jax-pallas`` switches it on); everything runs under ``jax.jit``,
``jax.grad`` and ``jax.vmap``. :func:`grouped_matmul` and
the functional MoE layer in :mod:`moerouter_jax.layer` compute the experts on the valid rows only.
"""

from dataclasses import fields

import jax

from moerouter import BackendInfo, Plan, Routing, SoftRouting, _registry
from moerouter_jax import _kernels, layer
from moerouter_jax._grouped import grouped_matmul
from moerouter_jax.layer import expert_mlp, init_balance_state, moe_apply, moe_init

__all__ = [
    "backend",
    "expert_mlp",
    "grouped_matmul",
    "init_balance_state",
    "layer",
    "moe_apply",
    "moe_init",
]


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
        kernels={
            "make_plan": _kernels.make_plan,
            "dispatch": _kernels.dispatch,
            "combine": _kernels.combine,
            "top_k": _kernels.top_k,
            "router": _kernels.router,
        },
        description="JAX (custom_vjp gather-only kernels; Pallas on GPU)",
        kernel_sets=(_kernels.PALLAS,),
    )
)
