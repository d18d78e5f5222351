"""GPU benchmarks of the torch/Triton, JAX/Pallas and CuPy kernels, each against a roof.

    python tools/gpu_bench.py --framework torch --out torch.jsonl [--budget 70]
    python tools/gpu_bench.py --dry-run    # lists the cases, checks the kernels exist
    python tools/gpu_bench.py --framework jax --smoke    # tiny shapes on the CPU: runs the code

``tools/gpu-check`` runs it once per framework, in its own process with its own time budget.
Configurations, most important first: bfloat16 before float32, T = 4096 before 16384, each of
OLMoE-like (d 2048, E 64, k 8) and Mixtral-like (d 4096, E 8, k 2). Per configuration:

- ``dispatch``, ``combine`` and their gradients: minimal bytes / time as a fraction of a
  device-to-device copy measured in the same process (``moerouter._bench``'s byte counts: each
  input row read once, each output row written once). Target: 0.8 for dispatch and combine.
  The obvious one-liner (``x[idx]``, a scatter-add) is timed beside them.
- ``make_plan``: the plugin's kernel against the agnostic path (latency-bound; bytes for scale).
- ``router``: the fused top-k kernel against the framework's own softmax + top-k code, on logits
  of the configuration's dtype. Target: 5x.
- ``grouped_mlp``: the SwiGLU expert MLP (intermediate 1024 for OLMoE, 14336 for Mixtral) on the
  dispatched rows against a per-expert loop of matmuls, with TFLOP/s.

Timing: a warm-up call (compilation), one calibration call, then 5 samples of back-to-back calls
(about 10 ms each); the median sample's time per call is reported. torch and CuPy read CUDA
events around each sample; JAX, which has no events, reads the wall clock around calls that are
dispatched asynchronously and waited for at the end of the sample. Inputs stay resident, so data
under the 60 MB L2 of an H200 can come from cache (the figures say which sizes those are).

Each figure is one JSON line, written and flushed as soon as it is measured: a run stopped at
its budget keeps everything measured before. The run also stops itself, skipping what is left
(one ``skipped`` line each), when its ``--budget`` runs out.

``--smoke`` runs every case of torch and JAX at tiny shapes on the CPU (Triton and Pallas in
their interpreters, wall-clock timing): the figures mean nothing, but every line of the GPU
run's code executes, so CI catches a broken benchmark before a GPU is lent.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout used without installing
    sys.path.insert(0, str(REPO))
for _plugin in ("torch", "jax", "cupy"):  # found after any installed copy
    if str(REPO / "backends" / _plugin) not in sys.path:
        sys.path.append(str(REPO / "backends" / _plugin))

import numpy as np  # noqa: E402

import moerouter as mr  # noqa: E402
from moerouter import _bench, _registry  # noqa: E402

FRAMEWORKS = ("torch", "jax", "cupy")
DTYPES = ("bfloat16", "float32")
TOKENS = (4096, 16384)
SHAPE_NAMES = ("olmoe", "mixtral")
#: Each expert's hidden width (OLMoE-1B-7B, Mixtral-8x7B).
INTERMEDIATE = {"olmoe": 1024, "mixtral": 14336}
OPS = (
    "dispatch",
    "combine",
    "dispatch_backward",
    "combine_backward",
    "make_plan",
    "router",
    "grouped_mlp",
)
#: Targets to report against, never to assert: fraction of copy bandwidth, or speedup.
TARGETS = {"dispatch": 0.8, "combine": 0.8, "router": 5.0}
#: What the cases call, by file and name: ``--dry-run`` fails if one is missing.
KERNELS = {
    "torch": {
        "backends/torch/moerouter_torch/_triton.py": (
            "dispatch",
            "combine",
            "combine_backward",
            "topk_router",
        ),
        "backends/torch/moerouter_torch/nn.py": ("GroupedMLP",),
    },
    "jax": {
        "backends/jax/moerouter_jax/_pallas.py": ("gather_rows", "gather_reduce", "topk_router"),
        "backends/jax/moerouter_jax/layer.py": ("expert_mlp",),
    },
    "cupy": {
        "backends/cupy/moerouter_cupy/_kernels.py": (
            "make_plan",
            "dispatch",
            "combine",
            "topk_router",
        ),
    },
}
#: Ops a framework's plugin has no kernel for.
NOT_AVAILABLE = {
    "cupy": {
        "dispatch_backward": "CuPy has no autograd",
        "combine_backward": "CuPy has no autograd",
        "grouped_mlp": "the CuPy plugin has no grouped expert MLP",
    }
}
ROOF_BYTES = 1 << 30  # far larger than the 60 MB L2
#: --smoke: shapes the interpreters run in seconds, and a small roof.
SMOKE_SHAPES = {
    "olmoe": _bench.Shape("olmoe", tokens=24, dim=32, experts=8, k=4),
    "mixtral": _bench.Shape("mixtral", tokens=24, dim=64, experts=4, k=2),
}
SMOKE_INTERMEDIATE = 16
SMOKE_ROOF_BYTES = 1 << 22
SAMPLES = 5
SAMPLE_MS = 10.0
MAX_CALLS_PER_SAMPLE = 200

Array = Any


@dataclasses.dataclass(frozen=True)
class Config:
    shape: _bench.Shape
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.shape.name} T={self.shape.tokens} {self.dtype}"


def configs(smoke: bool = False) -> list[Config]:
    """The configurations in the order they run (most important first)."""
    if smoke:  # each shape once, each dtype once
        return [
            Config(SMOKE_SHAPES["olmoe"], "bfloat16"),
            Config(SMOKE_SHAPES["mixtral"], "float32"),
        ]
    return [
        Config(dataclasses.replace(_bench.SHAPES[name], tokens=tokens), dtype)
        for dtype in DTYPES
        for tokens in TOKENS
        for name in SHAPE_NAMES
    ]


def intermediate(config: Config, smoke: bool) -> int:
    return SMOKE_INTERMEDIATE if smoke else INTERMEDIATE[config.shape.name]


@dataclasses.dataclass
class Case:
    """One figure: ``run`` timed, optionally against ``baseline``."""

    op: str
    path: str
    run: Callable[[], Any]
    nbytes: int | None = None
    flops: float | None = None
    baseline: Callable[[], Any] | None = None
    baseline_name: str | None = None
    check: Callable[[], str] | None = None


class Budget:
    """Seconds left of ``--budget``, counted from the start of the process."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Suite:
    """One framework: device arrays, a timer, the copy roof and the cases of a configuration.

    ``smoke``: the CPU, tiny shapes, interpreters, wall-clock timing (see the module docstring).
    """

    name = ""

    def __init__(self, smoke: bool = False) -> None:
        self.smoke = smoke
        self.roof_bytes = SMOKE_ROOF_BYTES if smoke else ROOF_BYTES

    def wall_ms(self, run: Callable[[], Any], calls: int) -> float:
        started = time.perf_counter()
        out = None
        for _ in range(calls):
            out = run()
        self.wait(out)
        return (time.perf_counter() - started) * 1e3

    def wait(self, out: Any) -> None:
        """Block until ``out`` is computed (wall-clock timing)."""

    def versions(self) -> dict[str, str]:
        raise NotImplementedError

    def device(self) -> str:
        raise NotImplementedError

    def kernel_path(self) -> str:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def elapsed_ms(self, run: Callable[[], Any], calls: int) -> float:
        """Milliseconds for ``calls`` back-to-back calls of ``run``, waited for."""
        raise NotImplementedError

    def copy_roof(self) -> tuple[float, float]:
        """(bytes per second, milliseconds) of a device-to-device copy of ``roof_bytes``."""
        raise NotImplementedError

    def roof_from(self, copy: Callable[[], Any]) -> tuple[float, float]:
        ms, _, _ = self.measure(copy, Budget(60.0))
        return 2 * self.roof_bytes / (ms / 1e3), ms

    def cases(self, config: Config) -> Iterator[Case]:
        raise NotImplementedError

    def measure(self, run: Callable[[], Any], budget: Budget) -> tuple[float, int, int]:
        """(median ms per call, samples, calls per sample) within what is left of ``budget``."""
        self.elapsed_ms(run, 1)  # compiles, allocates
        first = self.elapsed_ms(run, 1)
        if self.smoke:  # the code ran: that is all a smoke run is for
            return first, 1, 1
        calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(SAMPLE_MS / max(first, 1e-3))))
        affordable = int(max(0.0, budget.left() - 2.0) * 1e3 / max(first * calls, 1e-3))
        samples = max(0, min(SAMPLES, affordable))
        if samples == 0:
            return first, 1, 1
        times = [self.elapsed_ms(run, calls) / calls for _ in range(samples)]
        return statistics.median(times), samples, calls


def _host_inputs(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = config.shape
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((shape.tokens, shape.experts), dtype=np.float32)
    x = rng.standard_normal((shape.tokens, shape.dim), dtype=np.float32)
    grad = rng.standard_normal((shape.tokens, shape.dim), dtype=np.float32)
    return logits, x, grad


@contextlib.contextmanager
def agnostic_path() -> Iterator[None]:
    """The public functions on the agnostic path while inside (``MOEROUTER_BACKEND=reference``)."""
    with _bench._Variant("agnostic", force_reference=True):
        yield


def _tol(dtype: str) -> float:
    return 2e-2 if dtype == "bfloat16" else 1e-4


def _compare(name: str, have: np.ndarray, want: np.ndarray, tol: float | None) -> str:
    have, want = np.asarray(have, np.float64), np.asarray(want, np.float64)
    if have.shape != want.shape:
        return f"MISMATCH {name}: shape {have.shape} != {want.shape}"
    if tol is None:
        ok = np.array_equal(have, want)
    else:
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        ok = bool(np.all(np.abs(have - want) <= tol * scale))
    if ok:
        return "ok"
    worst = float(np.max(np.abs(have - want), initial=0.0))
    return f"MISMATCH {name}: max |difference| {worst:.3g}"


def _swiglu_flops(rows: int, dim: int, hidden: int) -> float:
    """FLOPs of ``(rows, d) @ (d, 2h)`` then ``(rows, h) @ (h, d)``: ``6 rows d h``."""
    return 2.0 * rows * dim * (2 * hidden) + 2.0 * rows * hidden * dim


# ---------------------------------------------------------------------------------- torch


class TorchSuite(Suite):
    name = "torch"

    def __init__(self, smoke: bool = False) -> None:
        super().__init__(smoke)
        if smoke:  # before anything imports Triton: its CPU interpreter
            os.environ["TRITON_INTERPRET"] = "1"
        import moerouter_torch
        import torch
        from moerouter_torch import _ops

        if not smoke and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.where = "cpu" if smoke else "cuda"
        self.torch = torch
        self.moerouter_torch = moerouter_torch
        self.ops = _ops

    def versions(self) -> dict[str, str]:
        torch = self.torch
        found = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
        try:
            import triton

            found["triton"] = triton.__version__
        except ImportError:
            found["triton"] = "not installed"
        return found

    def device(self) -> str:
        torch = self.torch
        if self.smoke:
            return "cpu (smoke)"
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"

    def kernel_path(self) -> str:
        from moerouter import _registry

        return "triton" if _registry.kernel_set_enabled(self.ops.TRITON) else "eager"

    def sync(self) -> None:
        if not self.smoke:
            self.torch.cuda.synchronize()

    def elapsed_ms(self, run: Callable[[], Any], calls: int) -> float:
        if self.smoke:
            return self.wall_ms(run, calls)
        start = self.torch.cuda.Event(enable_timing=True)
        stop = self.torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        stop.record()
        stop.synchronize()
        return float(start.elapsed_time(stop))

    def copy_roof(self) -> tuple[float, float]:
        torch = self.torch
        source = torch.ones(self.roof_bytes // 4, dtype=torch.float32, device=self.where)
        target = torch.zeros_like(source)
        return self.roof_from(lambda: target.copy_(source))

    def cases(self, config: Config) -> Iterator[Case]:
        torch = self.torch
        shape, dtype = config.shape, getattr(torch, config.dtype)
        tokens, dim, experts, k = shape.tokens, shape.dim, shape.experts, shape.k
        logits_host, x_host, grad_host = _host_inputs(config)
        logits = torch.from_numpy(logits_host).to(self.where)
        x = torch.from_numpy(x_host).to(self.where, dtype)
        router = mr.TopK(experts, k)
        routing = router(logits)
        plan = mr.make_plan(routing)
        rows, itemsize = plan.num_rows, x.element_size()
        sources = plan.source_tokens.long()
        ye = mr.dispatch(x, plan)
        path = self.kernel_path()
        naive_weights = routing.weights[plan.order.long()]

        def naive_combine() -> Any:
            out = torch.zeros((tokens, dim), dtype=torch.float32, device=self.where)
            out.index_add_(0, sources, ye.float() * naive_weights[:, None])
            return out.to(dtype)

        def check_dispatch() -> str:
            return _compare("dispatch", to_host(mr.dispatch(x, plan)), to_host(x[sources]), None)

        def check_combine() -> str:
            have, want = to_host(mr.combine(ye, plan)), to_host(naive_combine())
            return _compare("combine", have, want, _tol(config.dtype))

        yield Case(
            "dispatch", path, lambda: mr.dispatch(x, plan),
            nbytes=_bench.dispatch_bytes(tokens_read=tokens, rows=rows, dim=dim, itemsize=itemsize),
            baseline=lambda: x[sources], baseline_name="x[idx]", check=check_dispatch,
        )  # fmt: skip
        yield Case(
            "combine", path, lambda: mr.combine(ye, plan),
            nbytes=_bench.combine_bytes(tokens=tokens, rows=rows, dim=dim, itemsize=itemsize),
            baseline=naive_combine, baseline_name="index_add_", check=check_combine,
        )  # fmt: skip

        x_leaf = x.detach().requires_grad_()
        xe = mr.dispatch(x_leaf, plan)
        grad_xe = torch.ones_like(xe)
        yield Case(
            "dispatch_backward", path,
            lambda: torch.autograd.grad(xe, x_leaf, grad_xe, retain_graph=True),
            nbytes=_bench.dispatch_backward_bytes(
                tokens=tokens, rows=rows, dim=dim, itemsize=itemsize
            ),
        )  # fmt: skip
        ye_leaf = ye.detach().requires_grad_()
        weights_leaf = plan.combine_weights.detach().requires_grad_()
        y = mr.combine(ye_leaf, dataclasses.replace(plan, combine_weights=weights_leaf))
        grad_y = torch.from_numpy(grad_host).to(self.where, dtype)
        yield Case(
            "combine_backward", path,
            lambda: torch.autograd.grad(y, (ye_leaf, weights_leaf), grad_y, retain_graph=True),
            nbytes=_bench.combine_backward_bytes(
                tokens=tokens, rows=rows, dim=dim, itemsize=itemsize
            ),
        )  # fmt: skip

        def agnostic_plan() -> Any:
            with agnostic_path():
                return mr.make_plan(routing)

        def check_plan() -> str:
            return _compare(
                "make_plan", to_host(mr.make_plan(routing).combine_rows),
                to_host(agnostic_plan().combine_rows), None,
            )  # fmt: skip

        yield Case(
            "make_plan", "torch ops", lambda: mr.make_plan(routing),
            nbytes=_bench.plan_bytes(tokens=tokens, rows=rows, fan_in=k),
            baseline=agnostic_plan, baseline_name="agnostic", check=check_plan,
        )  # fmt: skip

        from moerouter_torch import _triton

        logits_narrow = logits.to(dtype)

        def eager_router() -> Any:
            probs = torch.softmax(logits_narrow.float(), dim=-1)
            weights, experts_chosen = torch.topk(probs, k, dim=-1)
            return experts_chosen, weights / weights.sum(-1, keepdim=True)

        def check_router() -> str:
            experts_chosen, _ = _triton.topk_router(logits_narrow, k)
            want = router(logits_narrow.float()).expert_ids
            return _compare("router experts", to_host(experts_chosen).ravel(), to_host(want), None)

        yield Case(
            "router", "triton", lambda: _triton.topk_router(logits_narrow, k),
            nbytes=_bench.router_bytes(tokens=tokens, columns=experts, rows=rows),
            baseline=eager_router, baseline_name="softmax+topk eager", check=check_router,
        )  # fmt: skip

        hidden = intermediate(config, self.smoke)
        mlp = self.moerouter_torch.GroupedMLP(experts, dim, hidden, device=self.where, dtype=dtype)
        group_sizes = plan.group_sizes
        activate = self.moerouter_torch.nn._activate

        def per_expert_loop() -> Any:
            out = torch.zeros_like(ye)
            start = 0
            for expert, size in enumerate(group_sizes.tolist()):  # a host sync, as in the wild
                rows_e = ye[start : start + size]
                out[start : start + size] = (
                    activate(rows_e @ mlp.w_in[expert], "swiglu") @ mlp.w_out[expert]
                )
                start += size
            return out

        def check_grouped() -> str:
            with torch.no_grad():
                return _compare(
                    "grouped_mlp", to_host(mlp(ye, group_sizes)), to_host(per_expert_loop()),
                    _tol(config.dtype),
                )  # fmt: skip

        from moerouter_torch import _grouped

        grouped_path = (
            "torch._grouped_mm" if _grouped._use_grouped_mm(ye, mlp.w_in) else "per-expert loop"
        )

        def grouped() -> Any:
            with torch.no_grad():
                return mlp(ye, group_sizes)

        def loop() -> Any:
            with torch.no_grad():
                return per_expert_loop()

        yield Case(
            "grouped_mlp", grouped_path, grouped, flops=_swiglu_flops(rows, dim, hidden),
            baseline=loop, baseline_name="per-expert loop", check=check_grouped,
        )  # fmt: skip


def to_host(array: Any) -> np.ndarray:
    """Any framework's array as a float64-safe NumPy array (bfloat16 widened to float32)."""
    if hasattr(array, "detach"):  # torch
        array = array.detach()
        if str(array.dtype) == "torch.bfloat16":
            array = array.float()
        return np.asarray(array.cpu().numpy())
    module = type(array).__module__.partition(".")[0]
    if module == "cupy":
        host = array.get()
    else:
        host = np.asarray(array)
    if host.dtype.name == "bfloat16":
        host = host.astype(np.float32)
    return np.asarray(host)


# ------------------------------------------------------------------------------------ JAX


class JaxSuite(Suite):
    name = "jax"

    def __init__(self, smoke: bool = False) -> None:
        super().__init__(smoke)
        import jax
        import moerouter_jax  # noqa: F401  (registers the plugin and the pytrees)
        from moerouter_jax import _pallas

        if smoke:
            _pallas.INTERPRET = True  # the fused router runs in the Pallas interpreter
        elif not any(device.platform == "gpu" for device in jax.devices()):
            raise RuntimeError("JAX sees no GPU")
        self.jax = jax

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__}

    def device(self) -> str:
        return str(self.jax.devices()[0].device_kind)

    def kernel_path(self) -> str:
        from moerouter_jax import _kernels

        from moerouter import _registry

        return "pallas" if _registry.kernel_set_enabled(_kernels.PALLAS) else "xla"

    def sync(self) -> None:
        (self.jax.device_put(0.0) + 0).block_until_ready()

    def wait(self, out: Any) -> None:
        self.jax.block_until_ready(out)

    def elapsed_ms(self, run: Callable[[], Any], calls: int) -> float:
        return self.wall_ms(run, calls)  # JAX has no events: calls are asynchronous until waited

    def copy_roof(self) -> tuple[float, float]:
        jnp = self.jax.numpy
        source = jnp.ones(self.roof_bytes // 4, jnp.float32)
        negate = self.jax.jit(lambda a: -a)  # reads and writes every byte, as a copy does
        return self.roof_from(lambda: negate(source))

    def cases(self, config: Config) -> Iterator[Case]:
        jax = self.jax
        jnp = jax.numpy
        from moerouter_jax import _pallas, layer

        shape, dtype = config.shape, getattr(jnp, config.dtype)
        tokens, dim, experts, k = shape.tokens, shape.dim, shape.experts, shape.k
        logits_host, x_host, grad_host = _host_inputs(config)
        logits = jnp.asarray(logits_host)
        x = jnp.asarray(x_host).astype(dtype)
        router = mr.TopK(experts, k)
        routing = jax.jit(router)(logits)
        plan = jax.jit(mr.make_plan)(routing)
        rows, itemsize = plan.num_rows, x.dtype.itemsize
        sources = plan.source_tokens
        dispatch = jax.jit(mr.dispatch)
        combine = jax.jit(mr.combine)
        ye = dispatch(x, plan)
        path = self.kernel_path()
        naive_dispatch = jax.jit(lambda x, sources: x[sources])
        naive_weights = routing.weights[plan.order]

        @jax.jit
        def naive_combine(ye: Array, sources: Array, weights: Array) -> Array:
            weighted = ye.astype(jnp.float32) * weights[:, None]
            return jnp.zeros((tokens, dim), jnp.float32).at[sources].add(weighted).astype(ye.dtype)

        yield Case(
            "dispatch", path, lambda: dispatch(x, plan),
            nbytes=_bench.dispatch_bytes(tokens_read=tokens, rows=rows, dim=dim, itemsize=itemsize),
            baseline=lambda: naive_dispatch(x, sources), baseline_name="x[idx]",
            check=lambda: _compare(
                "dispatch", to_host(dispatch(x, plan)), to_host(x[sources]), None
            ),
        )  # fmt: skip
        yield Case(
            "combine", path, lambda: combine(ye, plan),
            nbytes=_bench.combine_bytes(tokens=tokens, rows=rows, dim=dim, itemsize=itemsize),
            baseline=lambda: naive_combine(ye, sources, naive_weights),
            baseline_name=".at[].add",
            check=lambda: _compare(
                "combine", to_host(combine(ye, plan)),
                to_host(naive_combine(ye, sources, naive_weights)), _tol(config.dtype),
            ),
        )  # fmt: skip

        @jax.jit
        def dispatch_backward(x: Array, plan: mr.Plan, grad: Array) -> Array:
            return jax.vjp(lambda x: mr.dispatch(x, plan), x)[1](grad)[0]

        @jax.jit
        def combine_backward(ye: Array, plan: mr.Plan, grad: Array) -> Any:
            def forward(ye: Array, weights: Array) -> Array:
                return mr.combine(ye, dataclasses.replace(plan, combine_weights=weights))

            return jax.vjp(forward, ye, plan.combine_weights)[1](grad)

        grad_xe = jnp.ones_like(ye)
        grad_y = jnp.asarray(grad_host).astype(dtype)
        yield Case(
            "dispatch_backward", path, lambda: dispatch_backward(x, plan, grad_xe),
            nbytes=_bench.dispatch_backward_bytes(
                tokens=tokens, rows=rows, dim=dim, itemsize=itemsize
            ),
        )  # fmt: skip
        yield Case(
            "combine_backward", path, lambda: combine_backward(ye, plan, grad_y),
            nbytes=_bench.combine_backward_bytes(
                tokens=tokens, rows=rows, dim=dim, itemsize=itemsize
            ),
        )  # fmt: skip

        make_plan = jax.jit(mr.make_plan)
        agnostic_plan = jax.jit(lambda routing: mr.make_plan(routing))
        with agnostic_path():  # traced, and so compiled, on the agnostic path
            reference_plan = agnostic_plan(routing)
        yield Case(
            "make_plan", "jax (sort)", lambda: make_plan(routing),
            nbytes=_bench.plan_bytes(tokens=tokens, rows=rows, fan_in=k),
            baseline=lambda: agnostic_plan(routing), baseline_name="agnostic",
            check=lambda: _compare(
                "make_plan", to_host(make_plan(routing).combine_rows),
                to_host(reference_plan.combine_rows), None,
            ),
        )  # fmt: skip

        logits_narrow = logits.astype(dtype)
        fused = jax.jit(lambda logits: _pallas.topk_router(logits, k))

        @jax.jit
        def xla_router(logits: Array) -> tuple[Array, Array]:
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            weights, chosen = jax.lax.top_k(probs, k)
            return chosen, weights / jnp.sum(weights, axis=-1, keepdims=True)

        yield Case(
            "router", "pallas", lambda: fused(logits_narrow),
            nbytes=_bench.router_bytes(tokens=tokens, columns=experts, rows=rows),
            baseline=lambda: xla_router(logits_narrow), baseline_name="softmax+top_k (XLA)",
            check=lambda: _compare(
                "router experts", to_host(fused(logits_narrow)[0]).ravel(),
                to_host(router(logits_narrow.astype(jnp.float32)).expert_ids), None,
            ),
        )  # fmt: skip

        hidden = intermediate(config, self.smoke)
        keys = jax.random.split(jax.random.key(0), 2)
        w_in = (jax.random.normal(keys[0], (experts, dim, 2 * hidden)) / math.sqrt(dim)).astype(
            dtype
        )
        w_out = (jax.random.normal(keys[1], (experts, hidden, dim)) / math.sqrt(hidden)).astype(
            dtype
        )
        group_sizes = plan.group_sizes
        grouped = jax.jit(lambda w_in, w_out, xe, sizes: layer.expert_mlp(w_in, w_out, xe, sizes))
        sizes = [int(size) for size in np.asarray(group_sizes)]

        @jax.jit
        def per_expert_loop(w_in: Array, w_out: Array, xe: Array) -> Array:
            outs, start = [], 0
            for expert, size in enumerate(sizes):  # static sizes: the fastest form of a loop
                hidden_rows = xe[start : start + size] @ w_in[expert]
                gate, up = jnp.split(hidden_rows, 2, axis=-1)
                outs.append((jax.nn.silu(gate) * up) @ w_out[expert])
                start += size
            outs.append(jnp.zeros((xe.shape[0] - start, xe.shape[1]), xe.dtype))
            return jnp.concatenate(outs)

        yield Case(
            "grouped_mlp", "ragged_dot", lambda: grouped(w_in, w_out, ye, group_sizes),
            flops=_swiglu_flops(rows, dim, hidden),
            baseline=lambda: per_expert_loop(w_in, w_out, ye), baseline_name="per-expert loop",
            check=lambda: _compare(
                "grouped_mlp", to_host(grouped(w_in, w_out, ye, group_sizes)),
                to_host(per_expert_loop(w_in, w_out, ye)), _tol(config.dtype),
            ),
        )  # fmt: skip


# ----------------------------------------------------------------------------------- CuPy


class CupySuite(Suite):
    name = "cupy"

    def __init__(self, smoke: bool = False) -> None:
        super().__init__(smoke)
        if smoke:
            raise RuntimeError("CuPy needs a GPU: it has no smoke mode")
        import cupy
        import moerouter_cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy sees no CUDA device")
        self.cupy = cupy
        self.moerouter_cupy = moerouter_cupy

    def versions(self) -> dict[str, str]:
        cupy = self.cupy
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        return {"cupy": cupy.__version__, "cuda runtime": str(runtime)}

    def device(self) -> str:
        properties = self.cupy.cuda.runtime.getDeviceProperties(0)
        name = properties["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def kernel_path(self) -> str:
        from moerouter import _registry

        return "cuda" if _registry.kernel_set_enabled(self.moerouter_cupy.KERNELS) else "agnostic"

    def sync(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def elapsed_ms(self, run: Callable[[], Any], calls: int) -> float:
        cupy = self.cupy
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(calls):
            run()
        stop.record()
        stop.synchronize()
        return float(cupy.cuda.get_elapsed_time(start, stop))

    def copy_roof(self) -> tuple[float, float]:
        cupy = self.cupy
        source = cupy.ones(self.roof_bytes // 4, dtype=cupy.float32)
        target = cupy.zeros_like(source)
        return self.roof_from(lambda: cupy.copyto(target, source))

    def _device_dtype(self, name: str) -> Any:
        if name != "bfloat16":
            return np.dtype(name)
        import ml_dtypes  # CuPy >= 14 takes bfloat16 arrays through ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)

    def cases(self, config: Config) -> Iterator[Case]:
        cupy = self.cupy
        shape = config.shape
        tokens, dim, experts, k = shape.tokens, shape.dim, shape.experts, shape.k
        dtype = self._device_dtype(config.dtype)
        logits_host, x_host, _ = _host_inputs(config)
        logits = cupy.asarray(logits_host)
        x = cupy.asarray(x_host.astype(dtype))
        router = mr.TopK(experts, k)
        routing = router(logits)
        plan = mr.make_plan(routing)
        rows, itemsize = plan.num_rows, x.dtype.itemsize
        sources = cupy.asarray(plan.source_tokens)
        ye = mr.dispatch(x, plan)
        path = self.kernel_path()
        yield Case(
            "dispatch", path, lambda: mr.dispatch(x, plan),
            nbytes=_bench.dispatch_bytes(tokens_read=tokens, rows=rows, dim=dim, itemsize=itemsize),
            baseline=lambda: x[sources], baseline_name="x[idx]",
            check=lambda: _compare(
                "dispatch", to_host(mr.dispatch(x, plan)), to_host(x[sources]), None
            ),
        )  # fmt: skip

        def reference_combine() -> Any:
            with agnostic_path():
                return mr.combine(ye, plan)

        yield Case(
            "combine", path, lambda: mr.combine(ye, plan),
            nbytes=_bench.combine_bytes(tokens=tokens, rows=rows, dim=dim, itemsize=itemsize),
            baseline=reference_combine, baseline_name="agnostic",
            check=lambda: _compare(
                "combine", to_host(mr.combine(ye, plan)), to_host(reference_combine()),
                _tol(config.dtype),
            ),
        )  # fmt: skip

        def agnostic_plan() -> Any:
            with agnostic_path():
                return mr.make_plan(routing)

        yield Case(
            "make_plan", path, lambda: mr.make_plan(routing),
            nbytes=_bench.plan_bytes(tokens=tokens, rows=rows, fan_in=k),
            baseline=agnostic_plan, baseline_name="agnostic",
            check=lambda: _compare(
                "make_plan", to_host(mr.make_plan(routing).combine_rows),
                to_host(agnostic_plan().combine_rows), None,
            ),
        )  # fmt: skip
        logits_narrow = logits.astype(dtype)
        fused = self.moerouter_cupy.topk_router

        def eager_router() -> Any:
            values = logits_narrow.astype(cupy.float32)
            probs = cupy.exp(values - values.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            top = cupy.argpartition(-probs, k - 1, axis=1)[:, :k]
            chosen = cupy.take_along_axis(probs, top, axis=1)
            return top, chosen / chosen.sum(axis=1, keepdims=True)

        yield Case(
            "router", "cuda", lambda: fused(logits_narrow, k=k),
            nbytes=_bench.router_bytes(tokens=tokens, columns=experts, rows=rows),
            baseline=eager_router, baseline_name="softmax+argpartition eager",
            check=lambda: _compare(
                "router experts", to_host(fused(logits_narrow, k=k).expert_ids),
                to_host(router(logits_narrow.astype(cupy.float32)).expert_ids), None,
            ),
        )  # fmt: skip


SUITES: dict[str, Callable[[bool], Suite]] = {
    "torch": TorchSuite,
    "jax": JaxSuite,
    "cupy": CupySuite,
}


# --------------------------------------------------------------------------------- driver


def _record(case: Case, config: Config, ms: float, samples: int, calls: int) -> dict[str, Any]:
    shape = config.shape
    record: dict[str, Any] = {
        "kind": "figure",
        "op": case.op,
        "path": case.path,
        "shape": shape.name,
        "tokens": shape.tokens,
        "dim": shape.dim,
        "experts": shape.experts,
        "k": shape.k,
        "dtype": config.dtype,
        "ms": ms,
        "samples": samples,
        "calls_per_sample": calls,
    }
    if case.nbytes is not None:
        record["bytes"] = case.nbytes
        record["gb_per_s"] = case.nbytes / (ms / 1e3) / 1e9
    if case.flops is not None:
        record["tflop_per_s"] = case.flops / (ms / 1e3) / 1e12
    return record


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _measure_case(
    suite: Suite, case: Case, config: Config, roof: float, budget: Budget
) -> dict[str, Any]:
    """The figure of one case: its time, then (each on its own) baseline, target and check."""
    ms, samples, calls = suite.measure(case.run, budget)
    record = _record(case, config, ms, samples, calls)
    if case.nbytes is not None and case.op != "make_plan":
        record["fraction_of_copy"] = record["gb_per_s"] * 1e9 / roof
    if case.baseline is not None:
        record["baseline"] = case.baseline_name
        try:
            base_ms, _, _ = suite.measure(case.baseline, budget)
            record["baseline_ms"] = base_ms
            record["speedup"] = base_ms / ms
        except Exception as error:  # the baseline failing does not lose the kernel's figure
            record["baseline_error"] = _error(error)
    value = record.get("speedup") if case.op == "router" else record.get("fraction_of_copy")
    if case.op in TARGETS and value is not None:
        record["target"] = TARGETS[case.op]
        record["meets_target"] = bool(value >= TARGETS[case.op])
    if case.check is not None:
        try:
            record["check"] = case.check()
        except Exception as error:
            record["check"] = f"ERROR {_error(error)}"
    return record


def run_suite(suite: Suite, budget: Budget, emit: Callable[[dict[str, Any]], None]) -> int:
    """Every case of every configuration, in order, until the budget runs out; 1 on a mismatch."""
    roof, roof_ms = suite.copy_roof()
    emit({"kind": "roof", "roof": "device copy", "bytes": 2 * suite.roof_bytes, "ms": roof_ms,
          "gb_per_s": roof / 1e9})  # fmt: skip
    failures = 0
    done: set[tuple[str, str]] = set()
    for config in configs(suite.smoke):
        if budget.left() < 5.0:
            break
        try:
            cases = list(suite.cases(config))
        except Exception as error:  # one configuration failing (memory, compile) is a figure too
            emit({"kind": "error", "config": config.label, "error": _error(error)})
            done.update((config.label, op) for op in OPS)
            failures += 1
            continue
        for case in cases:
            if budget.left() < 3.0:
                break
            done.add((config.label, case.op))
            try:
                record = _measure_case(suite, case, config, roof, budget)
                failures += record.get("check", "ok") != "ok"
            except Exception as error:
                record = {"kind": "error", "op": case.op, "config": config.label,
                          "error": _error(error)}  # fmt: skip
                failures += 1
            emit(record)
        suite.sync()
    for config in configs(suite.smoke):
        for op in OPS:
            if (config.label, op) not in done:
                reason = NOT_AVAILABLE.get(suite.name, {}).get(op, "budget spent")
                emit({"kind": "skipped", "op": op, "config": config.label, "reason": reason})
    return 1 if failures else 0


def dry_run() -> int:
    """List the cases; fail if a framework's kernels are missing from the source tree."""
    problems = []
    for framework, files in KERNELS.items():
        for relative, names in files.items():
            path = REPO / relative
            if not path.is_file():
                problems.append(f"{framework}: {relative} is missing")
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            defined = {
                node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)
            }
            missing = [name for name in names if name not in defined]
            problems += [f"{framework}: {relative} defines no {name}" for name in missing]
    for framework in FRAMEWORKS:
        skipped = NOT_AVAILABLE.get(framework, {})
        ops = [op for op in OPS if op not in skipped]
        print(f"{framework}: {len(configs())} configurations x {', '.join(ops)}")
    for config in configs():
        print(f"  {config.label}")
    for problem in problems:
        print(f"MISSING {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=FRAMEWORKS)
    parser.add_argument("--out", type=Path, help="JSON lines, one per figure (default: stdout)")
    parser.add_argument("--budget", type=float, default=70.0, help="seconds (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases, run nothing")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (torch, jax): checks the code"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if args.framework is None:
        parser.error("--framework is required (or --dry-run)")
    budget = Budget(args.budget)
    handle = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout
    try:

        def emit(record: dict[str, Any]) -> None:
            handle.write(json.dumps({"framework": args.framework, **record}) + "\n")
            handle.flush()

        suite = SUITES[args.framework](args.smoke)
        unverified = os.environ.get(_registry.UNVERIFIED_KERNELS_VARIABLE, "")
        emit({"kind": "environment", "versions": suite.versions(), "device": suite.device(),
              "kernel_path": suite.kernel_path(), "unverified_kernels": unverified})  # fmt: skip
        return run_suite(suite, budget, emit)
    finally:
        if args.out:
            handle.close()


if __name__ == "__main__":
    sys.exit(main())
