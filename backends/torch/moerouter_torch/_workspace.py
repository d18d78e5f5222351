"""Reusable CPU output buffers: fresh large allocations, not copying, dominate CPU dispatch cost.

glibc serves a large ``torch.empty`` with a fresh ``mmap``, so every new output pays one page fault
per 4 KiB on first touch (measured: ``index_select`` into a fresh tensor 2.6 GB/s, into a reused
one 16.5 GB/s; reference/performance.md §5.2). Large outputs therefore come from a
:class:`moerouter._buffers.BufferPool` of NumPy byte buffers, wrapped with ``torch.frombuffer``:
the tensor's storage holds a reference to its buffer until the storage itself is freed, so a
buffer is reused only once no tensor, view, ``UntypedStorage``, autograd-saved tensor or
``.grad`` can reach it. The pool keeps at most ``MOEROUTER_TORCH_CACHE_MB`` megabytes (default
2048: a 1 GiB dispatch output, T*k = 131072 rows of 2048 float32, plus its alignment fits; 0
turns it off), least recently used out.
"""

from __future__ import annotations

import math

import torch

from moerouter._buffers import BufferPool

__all__ = ["pool", "release_workspaces", "workspace"]

pool = BufferPool("MOEROUTER_TORCH_CACHE_MB", default_megabytes=2048)


def workspace(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``, on a free pooled buffer if worth it.

    While the result, or anything derived from it, is alive its buffer is not handed out again.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    tensor = pool.take(nbytes, lambda region: torch.frombuffer(region, dtype=dtype).view(shape))
    return torch.empty(shape, dtype=dtype) if tensor is None else tensor


def release_workspaces() -> None:
    """Empty the pool: free buffers are freed, ones you still hold are freed with your tensors."""
    pool.clear()
