"""PyTorch backend plugin for moerouter: fast, deterministic plan, dispatch and combine.

Registers itself for ``torch.Tensor`` inputs. The kernels are ``torch.library`` custom ops
(``torch.ops.moerouter_torch.*``) with autograd and fake implementations, so a whole MoE layer
traces under ``torch.compile(fullgraph=True)``. On CPU they gather into reused workspaces and
reduce with FBGEMM's ``embedding_bag``; on CUDA they run Triton kernels when Triton is installed.
"""

from moerouter import BackendInfo, _registry
from moerouter_torch import _backend
from moerouter_torch._grouped import grouped_mm
from moerouter_torch._workspace import release_workspaces
from moerouter_torch.nn import GroupedMLP, MoE

__all__ = ["GroupedMLP", "MoE", "backend", "grouped_mm", "release_workspaces"]

# Registered on import, so torch.compile/jax.jit never trace the registry's lazy import.
backend = _registry.register(
    BackendInfo(
        name="torch",
        array_library="torch",
        kernels={
            "make_plan": _backend.make_plan,
            "dispatch": _backend.dispatch,
            "combine": _backend.combine,
        },
        description="PyTorch (custom ops: CPU gather/embedding_bag kernels, Triton on CUDA)",
    )
)
