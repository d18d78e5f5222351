"""Shared pieces of the asv benchmarks: shapes, inputs, the copy roof, minimal bytes, timing.

Everything is measured against a copy on the same device in the same process::

    bw_efficiency = (minimal_bytes / time) / copy_bandwidth

(DESIGN.md "Performance yardsticks", reference/performance.md §1.1 and §10). The timing loop,
the roof and the minimal byte counts are ``moerouter._benchlib``'s, the one harness that
``python -m moerouter bench`` and the plugins' benchmark scripts use too; this module adds only
what asv needs (shapes, parameters, inputs built outside the timed region).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import _benchlib
from moerouter._bench import router_bytes as _router_bytes

#: The copy roof's buffer: far larger than any cache (the CPU boxes have 24 GiB).
COPY_ROOF_BYTES = 256 * 2**20

BACKENDS = ["numpy", "torch"]

#: "auto": the kernel moerouter's registry picks for the array type (the agnostic path where a
#: backend has none); "agnostic": the array-API reference, forced with MOEROUTER_BACKEND.
PATHS = ["auto", "agnostic"]


@dataclass(frozen=True)
class Shape:
    tokens: int
    dim: int
    experts: int
    k: int


#: reference/performance.md §10.2.
SHAPES = {
    "ci-tiny": Shape(tokens=64, dim=256, experts=8, k=2),
    "mixtral": Shape(tokens=4096, dim=4096, experts=8, k=2),
    "olmoe": Shape(tokens=4096, dim=2048, experts=64, k=8),
}
SHAPE_NAMES = list(SHAPES)


# ----------------------------------------------------------------------------- minimal bytes


def dispatch_bytes(tokens_read: int, rows: int, dim: int, itemsize: int) -> int:
    """Each routed token read once, ``R`` rows written, ``R`` source indices read."""
    return _benchlib.dispatch_bytes(tokens_read=tokens_read, rows=rows, dim=dim, itemsize=itemsize)


def combine_bytes(tokens: int, rows: int, dim: int, itemsize: int) -> int:
    """``R`` rows read, ``T`` rows written, ``R`` indices and weights read."""
    return _benchlib.combine_bytes(tokens=tokens, rows=rows, dim=dim, itemsize=itemsize)


def router_bytes(tokens: int, columns: int, rows: int) -> int:
    """float32 logits read once, ``R`` expert ids and weights written."""
    return _router_bytes(tokens=tokens, columns=columns, rows=rows)


# ------------------------------------------------------------------------------- backends


def skip_unless_installed(backend: str) -> None:
    """asv skips a parameter combination whose setup raises NotImplementedError."""
    if importlib.util.find_spec(backend) is None:
        raise NotImplementedError(f"{backend} is not installed")


def choose_path(path: str) -> None:
    """Route this process's public calls to the registry's kernels or to the agnostic path."""
    if path == "agnostic":
        os.environ["MOEROUTER_BACKEND"] = "reference"
    else:
        os.environ.pop("MOEROUTER_BACKEND", None)


def asarray(backend: str, array: np.ndarray) -> Any:
    if backend == "numpy":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        return np.asarray(array.detach().cpu().numpy())
    return np.asarray(array)


def sync(array: Any) -> None:
    """Wait for asynchronous devices: ``torch.cuda.synchronize`` for CUDA tensors, else nothing."""
    if getattr(array, "is_cuda", False):
        import torch

        torch.cuda.synchronize(array.device)


def median_seconds(run: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``run()`` including a device sync, after untimed warm-up calls."""
    return _benchlib.median_seconds(run, sync, repeat, warmup)


def copy_bandwidth(backend: str, nbytes: int = COPY_ROOF_BYTES, repeat: int = 3) -> float:
    """Bytes per second of a device copy (read + write counted): the roof for this run."""
    if backend == "numpy":
        source = np.ones(nbytes // 4, dtype=np.float32)
        target = np.zeros_like(source)  # touched now, so the timed copies take no page faults

        def run() -> Any:
            return np.copyto(target, source)

    else:
        import torch

        source = torch.ones(nbytes // 4, dtype=torch.float32)
        target = torch.zeros_like(source)

        def run() -> Any:
            return target.copy_(source)

    return _benchlib.copy_bandwidth(run, nbytes, sync, repeat)


def naive_dispatch(x: Any, sources: Any) -> Any:
    """What one writes without a library: fancy indexing, a fresh output."""
    if isinstance(x, np.ndarray):
        return x[sources]
    return x[sources.long()]


def naive_combine(ye: Any, tokens: Any, weights: Any, num_tokens: int) -> Any:
    """Scatter-add of weighted rows: ``np.add.at`` / ``index_add_``."""
    if isinstance(ye, np.ndarray):
        out = np.zeros((num_tokens, ye.shape[1]), dtype=ye.dtype)
        np.add.at(out, tokens, ye * weights[:, None])
        return out
    import torch

    out = torch.zeros((num_tokens, ye.shape[1]), dtype=ye.dtype)
    return out.index_add_(0, tokens.long(), ye * weights[:, None])


# --------------------------------------------------------------------------------- inputs


class Problem:
    """Inputs of one shape on one backend, built outside every timed region.

    Routing is top-k of Gaussian logits (near-uniform load); ``naive_*`` hold the same routing in
    the form the one-liners need (valid rows only, weights in dispatch order).
    """

    def __init__(self, shape_name: str, backend: str, seed: int = 0) -> None:
        shape = SHAPES[shape_name]
        rng = np.random.default_rng(seed)
        self.shape = shape
        self.backend = backend
        x = rng.standard_normal((shape.tokens, shape.dim), dtype=np.float32)
        logits = rng.standard_normal((shape.tokens, shape.experts), dtype=np.float32)
        self.itemsize = x.itemsize
        self.x = asarray(backend, x)
        self.logits = asarray(backend, logits)
        self.routing = mr.TopK(shape.experts, shape.k)(self.logits)
        self.plan = mr.make_plan(self.routing)
        self.ye = mr.dispatch(self.x, self.plan)
        self.rows = int(np.count_nonzero(to_numpy(self.routing.expert_ids) >= 0))
        num_valid = int(to_numpy(self.plan.num_valid))
        sources = to_numpy(self.plan.source_tokens)[:num_valid]
        order = to_numpy(self.plan.order)[:num_valid]
        self.tokens_read = int(np.unique(sources).size)
        self.naive_sources = asarray(backend, np.ascontiguousarray(sources))
        self.naive_weights = asarray(backend, to_numpy(self.routing.weights)[order])
        self.naive_ye = self.ye[:num_valid]

    def dispatch(self) -> Any:
        return mr.dispatch(self.x, self.plan)

    def combine(self) -> Any:
        return mr.combine(self.ye, self.plan)

    def naive_dispatch(self) -> Any:
        return naive_dispatch(self.x, self.naive_sources)

    def naive_combine(self) -> Any:
        return naive_combine(
            self.naive_ye, self.naive_sources, self.naive_weights, self.shape.tokens
        )

    def dispatch_bytes(self) -> int:
        return dispatch_bytes(self.tokens_read, self.rows, self.shape.dim, self.itemsize)

    def combine_bytes(self) -> int:
        return combine_bytes(self.shape.tokens, self.rows, self.shape.dim, self.itemsize)


def bw_efficiency(backend: str, run: Callable[[], Any], nbytes: int, repeat: int = 3) -> float:
    """``(nbytes / time) / copy bandwidth``, both measured now, in this process."""
    roof = copy_bandwidth(backend)
    return _benchlib.bw_efficiency(nbytes, median_seconds(run, repeat=repeat), roof)
