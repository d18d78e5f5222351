"""CuPy backend plugin for moerouter: CUDA kernels loaded with ``cupy.RawModule``.

Registers itself for ``cupy.ndarray`` inputs with fast ``make_plan`` (counting sort),
``dispatch`` (16-byte vector row copies) and ``combine`` (float32 gather-reduce, no atomics),
and offers a fused top-k router, :func:`topk_router`. The kernels live in ``kernels/*.cu``.

Importing this package does not import CuPy: the kernels do, when first called. The functions
here also accept torch and JAX CUDA arrays through DLPack, without a copy.

.. warning:: As of this version the CUDA kernels have been compiled (nvcc, sm_80 and sm_90) but
   have not yet run on a GPU; the GPU tests (marked ``gpu``) are written and wait for one. Until
   they pass, CuPy arrays take the agnostic path unless ``MOEROUTER_CUPY_KERNELS=1`` opts in
   (the GPU tests set it). The functions here can always be called directly.
"""

import os

from moerouter import BackendInfo, _registry
from moerouter_cupy._kernels import combine, dispatch, make_plan, topk_router

__all__ = ["backend", "combine", "dispatch", "make_plan", "topk_router"]

# Kernels that never ran on a GPU are not the default: a wrong result must not be silent.
_OPTED_IN = os.environ.get("MOEROUTER_CUPY_KERNELS") == "1"

# Registered on import, so torch.compile/jax.jit never trace the registry's lazy import.
backend = _registry.register(
    BackendInfo(
        name="cupy",
        array_library="cupy",
        kernels={"make_plan": make_plan, "dispatch": dispatch, "combine": combine}
        if _OPTED_IN
        else {},
        description="CuPy (CUDA RawModule kernels, opt-in with MOEROUTER_CUPY_KERNELS=1 until "
        "validated on a GPU)"
        if not _OPTED_IN
        else "CuPy (CUDA RawModule kernels: counting-sort plan, vector dispatch, combine)",
    )
)
