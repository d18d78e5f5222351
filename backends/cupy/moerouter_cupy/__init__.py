"""CuPy backend plugin for moerouter.

Registers itself for ``cupy.ndarray`` inputs. It provides no fast kernels yet: plan, dispatch and
combine run on the agnostic array-API path.
"""

from moerouter import BackendInfo

__all__ = ["backend"]

backend = BackendInfo(
    name="cupy",
    array_library="cupy",
    kernels={},
    description="CuPy (agnostic path; CUDA kernels not yet provided)",
)
