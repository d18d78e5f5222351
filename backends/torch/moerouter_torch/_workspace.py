"""Reusable CPU output buffers: fresh large allocations, not copying, dominate CPU dispatch cost.

glibc serves a large ``torch.empty`` with a fresh ``mmap``, so every new output pays one page fault
per 4 KiB on first touch (measured: ``index_select`` into a fresh tensor 2.6 GB/s, into a reused
one 16.5 GB/s; reference/performance.md §5.2). The pool keeps a few buffers per (dtype, size) and
hands out a buffer again only once nothing else holds its storage: the caller's tensor, autograd's
saved tensors, views and ``.grad`` all count, so a reused buffer can never overwrite live data.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["release_workspaces", "workspace"]

#: Buffers kept per (dtype, number of elements); a caller holding more gets fresh allocations.
MAX_BUFFERS_PER_SIZE = 2
#: Smaller outputs come from malloc's own caches quickly: pooling them buys nothing.
MIN_POOLED_BYTES = 1 << 20

_lock = threading.Lock()
_pool: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}


def _unused(buffer: torch.Tensor) -> bool:
    # The pool's tensor and the temporary UntypedStorage object are the only two references when
    # no other tensor (alias, view, autograd's saved copy) shares the storage.
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2


def workspace(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``, reusing a free pooled buffer if any.

    The result is a new tensor (not a view) on the pooled storage: while it, or anything derived
    from it, is alive the buffer is not handed out again.
    """
    numel = 1
    for size in shape:
        numel *= size
    if numel * torch.empty((), dtype=dtype).element_size() < MIN_POOLED_BYTES:
        return torch.empty(shape, dtype=dtype)
    key = (dtype, numel)
    with _lock:
        buffers = _pool.setdefault(key, [])
        chosen = next((b for b in buffers if _unused(b)), None)
        if chosen is None:
            if len(buffers) >= MAX_BUFFERS_PER_SIZE:
                return torch.empty(shape, dtype=dtype)
            chosen = torch.empty(numel, dtype=dtype)
            buffers.append(chosen)
        strides = []
        stride = 1
        for size in reversed(shape):
            strides.append(stride)
            stride *= size
        return torch.empty(0, dtype=dtype).set_(
            chosen.untyped_storage(), 0, shape, tuple(reversed(strides))
        )


def release_workspaces() -> None:
    """Drop every pooled buffer (memory returns once callers drop their results too)."""
    with _lock:
        _pool.clear()
