"""JAX: make_plan, dispatch, combine and their gradients against JAX's own copy roof.

Every op is ``jax.jit``-compiled once in ``setup`` (compilation is not timed) and timed with
``block_until_ready``. The roof is a jitted ``a + 1`` over 256 MiB on the same device in the same
process (an XLA copy might be elided; an add cannot), counting read + write::

    bw_efficiency = (minimal_bytes / time) / copy_bandwidth

``path`` is "auto" (the moerouter_jax kernels) or "agnostic" (the array-API reference, traced with
``MOEROUTER_BACKEND=reference``). Run once without asv::

    cd asv_bench && python -c "from benchmarks import bench_jax; bench_jax.report()"
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import _benchlib

from . import common

SHAPES = ["ci-tiny", "olmoe"]
PATHS = ["auto", "agnostic"]
DTYPES = ["float32", "bfloat16"]


def _skip_without_jax() -> None:
    if importlib.util.find_spec("jax") is None:
        raise NotImplementedError("jax is not installed")


def _ready(result: Any) -> Any:
    import jax

    return jax.block_until_ready(result)


def median_seconds(run: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    return _benchlib.median_seconds(run, _ready, repeat, warmup)


def copy_bandwidth(nbytes: int = common.COPY_ROOF_BYTES, repeat: int = 5) -> float:
    """Bytes per second (read + write) of a jitted ``a + 1`` on JAX's default device."""
    import jax
    import jax.numpy as jnp

    source = jnp.ones(nbytes // 4, jnp.float32)
    add = jax.jit(lambda a: a + 1.0)
    return _benchlib.copy_bandwidth(lambda: add(source), nbytes, _ready, repeat)


class _Problem:
    """Inputs and jitted ops of one shape, built outside the timed region."""

    def __init__(self, shape_name: str, path: str, dtype: str) -> None:
        import jax
        import jax.numpy as jnp
        import moerouter_jax  # noqa: F401  (registers the kernels and the pytrees)

        common.choose_path(path)
        shape = common.SHAPES[shape_name]
        rng = np.random.default_rng(0)
        self.shape = shape
        x = jnp.asarray(rng.standard_normal((shape.tokens, shape.dim), dtype=np.float32))
        self.x = x.astype(dtype)
        self.logits = jnp.asarray(
            rng.standard_normal((shape.tokens, shape.experts), dtype=np.float32)
        )
        router = mr.TopK(shape.experts, shape.k)
        self.routing = router(self.logits)
        # Fresh jitted functions, traced now under the chosen path.
        self._plan = jax.jit(mr.make_plan)
        self.plan = self._plan(self.routing)
        self._dispatch = jax.jit(mr.dispatch)
        self._combine = jax.jit(mr.combine)
        self.ye = self._dispatch(self.x, self.plan)

        def loss(x: Any, logits: Any) -> Any:
            plan = mr.make_plan(router(logits))
            return jnp.sum(mr.combine(mr.dispatch(x, plan), plan).astype(jnp.float32))

        self._step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        self.itemsize = self.x.dtype.itemsize
        self.rows = int(np.count_nonzero(np.asarray(self.routing.expert_ids) >= 0))
        for op in (self.make_plan, self.dispatch, self.combine, self.train_step):
            _ready(op())  # compile now

    def make_plan(self) -> Any:
        return self._plan(self.routing)

    def dispatch(self) -> Any:
        return self._dispatch(self.x, self.plan)

    def combine(self) -> Any:
        return self._combine(self.ye, self.plan)

    def train_step(self) -> Any:
        return self._step(self.x, self.logits)

    def dispatch_bytes(self) -> int:
        return common.dispatch_bytes(self.shape.tokens, self.rows, self.shape.dim, self.itemsize)

    def combine_bytes(self) -> int:
        return common.combine_bytes(self.shape.tokens, self.rows, self.shape.dim, self.itemsize)


class JaxKernels:
    params = (SHAPES, PATHS, DTYPES)
    param_names = ("shape", "path", "dtype")
    number = 1
    repeat = (1, 5, 20.0)
    timeout = 600.0

    def setup(self, shape: str, path: str, dtype: str) -> None:
        _skip_without_jax()
        self.problem = _Problem(shape, path, dtype)

    def teardown(self, shape: str, path: str, dtype: str) -> None:
        common.choose_path("auto")

    def time_make_plan(self, shape: str, path: str, dtype: str) -> None:
        _ready(self.problem.make_plan())

    def time_dispatch(self, shape: str, path: str, dtype: str) -> None:
        _ready(self.problem.dispatch())

    def time_combine(self, shape: str, path: str, dtype: str) -> None:
        _ready(self.problem.combine())

    def time_route_dispatch_combine_grad(self, shape: str, path: str, dtype: str) -> None:
        _ready(self.problem.train_step())

    def track_dispatch_bw_efficiency(self, shape: str, path: str, dtype: str) -> float:
        p = self.problem
        return p.dispatch_bytes() / median_seconds(p.dispatch) / copy_bandwidth()

    def track_combine_bw_efficiency(self, shape: str, path: str, dtype: str) -> float:
        p = self.problem
        return p.combine_bytes() / median_seconds(p.combine) / copy_bandwidth()

    track_dispatch_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]
    track_combine_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


def report(shape: str = "olmoe", dtypes: tuple[str, ...] = ("float32",), repeat: int = 7) -> None:
    """Print one measurement of every op and path (what the docs quote)."""
    saved = os.environ.get("MOEROUTER_BACKEND")
    roof = copy_bandwidth(repeat=repeat)
    print(f"JAX copy roof (jit a + 1, 256 MiB): {roof / 1e9:.2f} GB/s")
    try:
        for dtype in dtypes:
            for path in PATHS:
                p = _Problem(shape, path, dtype)
                for name, op, nbytes in (
                    ("make_plan", p.make_plan, None),
                    ("dispatch", p.dispatch, p.dispatch_bytes()),
                    ("combine", p.combine, p.combine_bytes()),
                    ("grad(route+dispatch+combine)", p.train_step, None),
                ):
                    seconds = median_seconds(op, repeat=repeat)
                    line = f"{shape} {dtype:<8} {path:<8} {name:<30} {1e3 * seconds:8.2f} ms"
                    if nbytes is not None:
                        rate = nbytes / seconds
                        line += f"  {rate / 1e9:6.2f} GB/s  bw_eff {rate / roof:.2f}"
                    print(line)
    finally:
        common.choose_path("agnostic" if saved == "reference" else "auto")
