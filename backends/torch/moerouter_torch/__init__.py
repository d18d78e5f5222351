"""PyTorch backend plugin for moerouter.

Registers itself for ``torch.Tensor`` inputs. It provides no fast kernels yet: plan, dispatch and
combine run on the agnostic array-API path, which already supports autograd and ``torch.compile``.
"""

from moerouter import BackendInfo

__all__ = ["backend"]

backend = BackendInfo(
    name="torch",
    array_library="torch",
    kernels={},
    description="PyTorch (agnostic path; fast kernels not yet provided)",
)
