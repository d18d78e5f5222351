"""CuPy backend plugin for moerouter: CUDA kernels loaded with ``cupy.RawModule``.

Registers itself for ``cupy.ndarray`` inputs with fast ``make_plan`` (counting sort),
``dispatch`` (16-byte vector row copies) and ``combine`` (float32 gather-reduce, no atomics),
and offers a fused top-k router, :func:`topk_router`. The kernels live in ``kernels/*.cu``.

Importing this package does not import CuPy: the kernels do, when first called. The functions
here also accept torch and JAX CUDA arrays through DLPack, without a copy.

.. warning:: As of this version the CUDA kernels have been compiled (nvcc, sm_80 and sm_90) but
   have not yet passed on a GPU; the GPU tests (marked ``gpu``) are written and wait for one. Until
   they pass, their kernel set :data:`KERNELS` (``cupy-cuda``) is off and CuPy arrays take the
   agnostic path, unless ``MOEROUTER_UNVERIFIED_KERNELS=cupy-cuda`` switches it on (the GPU tests
   and ``tools/gpu-check`` do). The functions here can always be called directly.
"""

from moerouter import BackendInfo, KernelSet, _registry
from moerouter_cupy._kernels import combine, dispatch, make_plan, router, topk_router

__all__ = ["KERNELS", "backend", "combine", "dispatch", "make_plan", "topk_router"]

#: The CUDA kernels behind make_plan, dispatch, combine and the token-choice router for CuPy arrays.
KERNELS = KernelSet(
    name="cupy-cuda",
    description="CUDA RawModule kernels: counting-sort plan, vector dispatch, combine, fused "
    "top-k router (the agnostic path otherwise)",
    verified_on="",
    replaces=frozenset({"make_plan", "dispatch", "combine", "router"}),
)

# Registered on import, so torch.compile/jax.jit never trace the registry's lazy import.
backend = _registry.register(
    BackendInfo(
        name="cupy",
        array_library="cupy",
        kernels={
            "make_plan": make_plan,
            "dispatch": dispatch,
            "combine": combine,
            "router": router,
        },
        description="CuPy (CUDA RawModule kernels)",
        kernel_sets=(KERNELS,),
    )
)
