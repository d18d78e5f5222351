"""PyTorch backend plugin for moerouter: fast, deterministic plan, dispatch and combine.

Registers itself for ``torch.Tensor`` inputs. The kernels are ``torch.library`` custom ops
(``torch.ops.moerouter_torch.*``) with autograd and fake implementations, so a whole MoE layer
traces under ``torch.compile(fullgraph=True)``. On CPU they gather into reused workspaces and
reduce with FBGEMM's ``embedding_bag``; on CUDA they run Triton kernels when Triton is installed
and the ``torch-triton`` kernel set is on (the same PyTorch ops as on CPU otherwise).

.. warning:: The Triton kernels and the ``torch._grouped_mm`` path have not yet passed on a real
   GPU, so their kernel sets (``torch-triton``, ``torch-grouped-mm``) are off by default;
   ``MOEROUTER_UNVERIFIED_KERNELS=torch-triton,torch-grouped-mm`` switches them on
   (``tools/gpu-check`` does, to prove them).
"""

from moerouter import BackendInfo, _registry
from moerouter_torch import _backend, _ops, _router
from moerouter_torch._grouped import GROUPED_MM, grouped_mm
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
            "top_k": _router.top_k,
            "router": _router.router,
        },
        description="PyTorch (custom ops: gather/embedding_bag kernels, Triton on CUDA)",
        kernel_sets=(_ops.TRITON, GROUPED_MM),
    )
)
