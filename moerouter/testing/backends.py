"""The backends the test matrix runs on: one enum drives every parametrisation."""

from __future__ import annotations

import enum
import importlib
import importlib.util
from typing import Any

import numpy as np

__all__ = ["Backend", "to_numpy"]


class Backend(enum.Enum):
    """An array library moerouter is tested on, with how to build and read its arrays."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    JAX = "jax"
    CUPY = "cupy"

    def __str__(self) -> str:
        return self.value

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here, or None when it can."""
        if importlib.util.find_spec(self.value) is None:
            return f"{self.value} is not installed"
        if self is Backend.CUPY:
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() < 1:
                    return "cupy needs a CUDA GPU"
            except Exception as error:  # no driver, no runtime
                return f"cupy cannot reach a GPU ({type(error).__name__})"
        return None

    def namespace(self) -> Any:
        """The array-API namespace of this backend."""
        if self is Backend.NUMPY:
            return np
        if self is Backend.JAX:
            return importlib.import_module("jax.numpy")
        if self is Backend.ARRAY_API_STRICT:
            return importlib.import_module("array_api_strict")
        return importlib.import_module(f"array_api_compat.{self.value}")

    def asarray(self, array: Any, dtype: str | None = None) -> Any:
        """Copy a NumPy array onto this backend, as ``dtype`` if given (a name, or "bfloat16")."""
        xp = self.namespace()
        array = np.asarray(array)
        if dtype is None:
            return xp.asarray(array)
        if dtype == "bfloat16":
            if self is Backend.TORCH:
                import torch

                return torch.asarray(array.astype(np.float32)).to(torch.bfloat16)
            if self is Backend.JAX:
                return xp.asarray(array.astype(np.float32), dtype=xp.bfloat16)
            raise ValueError(f"{self} has no bfloat16")
        return xp.asarray(array.astype(dtype))

    @property
    def has_bfloat16(self) -> bool:
        return self in (Backend.TORCH, Backend.JAX)

    @property
    def has_float16(self) -> bool:
        return self is not Backend.ARRAY_API_STRICT


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of any backend's array (detached, on the host; bfloat16 becomes float32)."""
    module = type(array).__module__.partition(".")[0]
    if module == "torch":
        import torch

        if array.dtype == torch.bfloat16:
            array = array.float()
        return np.asarray(array.detach().cpu().numpy())
    if module == "cupy":
        return np.asarray(array.get())
    if module == "array_api_strict":
        return np.from_dlpack(array).copy()
    result = np.asarray(array)
    if result.dtype.name == "bfloat16":
        result = result.astype(np.float32)
    return result
