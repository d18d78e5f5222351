"""``python -m moerouter bench``: routing, plan, dispatch and combine against the copy roof.

Every number is relative to a device copy measured in the same run (``np.copyto``,
``Tensor.copy_``) on a buffer far larger than the caches::

    bw_efficiency = (minimal_bytes / time) / copy_bandwidth

``minimal_bytes`` reads each input row once and writes each output row once, counting only the
``R`` rows that reach a real expert (DESIGN.md "Performance yardsticks", reference/performance.md
§1.1). Each op is also compared with the obvious library one-liner (``x[idx]`` for dispatch,
``np.add.at`` / ``index_add_`` for combine), after checking that both give the same answer.

Times are medians over ``--repeat`` runs after one warm-up run; inputs are built outside the timed
region, outputs are allocated by the op itself (that is part of its cost). Frameworks are
imported only when asked for: ``import moerouter`` stays framework-free.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import _registry
from moerouter._benchlib import (
    INDEX_BYTES,
    WEIGHT_BYTES,
    combine_backward_bytes,
    combine_bytes,
    dispatch_backward_bytes,
    dispatch_bytes,
    paired_median_seconds,
)
from moerouter._benchlib import median_seconds as _median_seconds
from moerouter._typing import Array

__all__ = [
    "SHAPES",
    "Result",
    "Shape",
    "combine_backward_bytes",
    "combine_bytes",
    "dispatch_backward_bytes",
    "dispatch_bytes",
    "main",
]


@dataclass(frozen=True)
class Shape:
    """A benchmark problem: ``T`` tokens of width ``d`` routed to ``k`` of ``E`` experts."""

    name: str
    tokens: int
    dim: int
    experts: int
    k: int


#: reference/performance.md §10.2.
SHAPES: dict[str, Shape] = {
    "ci-tiny": Shape("ci-tiny", tokens=64, dim=256, experts=8, k=2),
    "mixtral": Shape("mixtral", tokens=4096, dim=4096, experts=8, k=2),
    "olmoe": Shape("olmoe", tokens=4096, dim=2048, experts=64, k=8),
}


def plan_bytes(*, tokens: int, rows: int, fan_in: int) -> int:
    """Minimal traffic of make_plan: read ids and weights, write order/inverse/sources and the
    ``(T, F)`` combine table. Plan building is latency-bound; the figure is for scale only."""
    reads = rows * (INDEX_BYTES + WEIGHT_BYTES)
    writes = 3 * rows * INDEX_BYTES + tokens * fan_in * (INDEX_BYTES + WEIGHT_BYTES)
    return reads + writes


def router_bytes(*, tokens: int, columns: int, rows: int) -> int:
    """Minimal traffic of a router: read the float32 logits once, write ``R`` ids and weights."""
    return tokens * columns * 4 + rows * (INDEX_BYTES + WEIGHT_BYTES)


# ------------------------------------------------------------------------------------ backends


class _Library:
    """What the bench needs from one array library, behind one small interface."""

    name: str
    version: str

    def asarray(self, array: np.ndarray) -> Array:
        raise NotImplementedError

    def to_numpy(self, array: Array) -> np.ndarray:
        raise NotImplementedError

    def sync(self, array: Array) -> None:
        """Wait until ``array`` is computed (asynchronous devices); no-op on CPU."""

    def copy_seconds(self, nbytes: int, repeat: int) -> float:
        raise NotImplementedError

    def naive_dispatch(self, x: Array, sources: Array) -> Array:
        raise NotImplementedError

    def naive_combine(self, ye: Array, tokens: Array, weights: Array, num_tokens: int) -> Array:
        raise NotImplementedError


class _NumPy(_Library):
    name = "numpy"
    version = np.__version__

    def asarray(self, array: np.ndarray) -> Array:
        return array

    def to_numpy(self, array: Array) -> np.ndarray:
        return np.asarray(array)

    def copy_seconds(self, nbytes: int, repeat: int) -> float:
        source = np.ones(nbytes // 4, dtype=np.float32)
        target = np.zeros_like(source)  # touched, so no page faults in the timed copies
        return _median_seconds(lambda: np.copyto(target, source), lambda _: None, repeat)

    def naive_dispatch(self, x: Array, sources: Array) -> Array:
        return x[sources]

    def naive_combine(self, ye: Array, tokens: Array, weights: Array, num_tokens: int) -> Array:
        out = np.zeros((num_tokens, ye.shape[1]), dtype=ye.dtype)
        np.add.at(out, tokens, ye * weights[:, None])
        return out


class _Torch(_Library):
    name = "torch"

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.version = str(torch.__version__)
        self.device = torch.device(device)

    def asarray(self, array: np.ndarray) -> Array:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_numpy(self, array: Array) -> np.ndarray:
        return np.asarray(array.detach().cpu().numpy())

    def sync(self, array: Array) -> None:
        if getattr(array, "is_cuda", False):
            self.torch.cuda.synchronize(array.device)

    def copy_seconds(self, nbytes: int, repeat: int) -> float:
        source = self.torch.ones(nbytes // 4, dtype=self.torch.float32, device=self.device)
        target = self.torch.zeros_like(source)
        return _median_seconds(lambda: target.copy_(source), self.sync, repeat)

    def naive_dispatch(self, x: Array, sources: Array) -> Array:
        return x[sources.long()]

    def naive_combine(self, ye: Array, tokens: Array, weights: Array, num_tokens: int) -> Array:
        out = self.torch.zeros((num_tokens, ye.shape[1]), dtype=ye.dtype, device=ye.device)
        return out.index_add_(0, tokens.long(), ye * weights[:, None])


def _libraries(choice: str, device: str) -> tuple[list[_Library], list[str]]:
    """The requested libraries that can run here, and why the others were skipped."""
    found: list[_Library] = []
    skipped: list[str] = []
    if choice in ("numpy", "all"):
        found.append(_NumPy())
    if choice in ("torch", "all"):
        try:
            found.append(_Torch(device))
        except ImportError:
            skipped.append("torch: not installed")
    return found, skipped


# -------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    op: str
    backend: str
    shape: str
    dtype: str
    path: str
    median_ms: float
    bytes: int
    gb_per_s: float
    bw_efficiency: float
    vs_naive: float | None


class _Variant:
    """A way to run a public op: as the registry chooses, or forced onto the agnostic path.

    ``MOEROUTER_BACKEND=reference`` is read on every call, so setting it for the duration of a
    ``with`` block is enough to force the agnostic path.
    """

    def __init__(self, name: str, force_reference: bool) -> None:
        self.name = name
        self.force_reference = force_reference
        self._saved: str | None = None

    def __enter__(self) -> _Variant:
        self._saved = os.environ.get(_BACKEND_VARIABLE)
        if self.force_reference:
            os.environ[_BACKEND_VARIABLE] = "reference"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is None:
            os.environ.pop(_BACKEND_VARIABLE, None)
        else:
            os.environ[_BACKEND_VARIABLE] = self._saved


_BACKEND_VARIABLE = "MOEROUTER_BACKEND"


def _variants(kernel: str, array: Array, paths: str) -> list[_Variant]:
    """The paths of ``kernel`` to time: the registry's choice and/or the agnostic reference."""
    has_kernel = _registry.kernel_for(kernel, array) is not None
    chosen = _Variant("kernel" if has_kernel else "agnostic", force_reference=False)
    reference = _Variant("agnostic", force_reference=True)
    if paths == "auto" or (paths == "both" and not has_kernel):
        return [chosen]
    if paths == "agnostic":
        return [reference]
    return [chosen, reference]


def _bench_shape(
    lib: _Library, shape: Shape, repeat: int, copy_bytes_per_s: float, seed: int, paths: str
) -> tuple[list[Result], list[str]]:
    """Every op at one shape on one library; returns the rows and any correctness failures."""
    rng = np.random.default_rng(seed)
    tokens, dim, experts, k = shape.tokens, shape.dim, shape.experts, shape.k
    x_host = rng.standard_normal((tokens, dim), dtype=np.float32)
    logits_host = rng.standard_normal((tokens, experts), dtype=np.float32)
    num_null = max(1, experts // 2)
    null_logits_host = rng.standard_normal((tokens, experts + num_null), dtype=np.float32)
    x, logits, null_logits = (lib.asarray(a) for a in (x_host, logits_host, null_logits_host))
    itemsize = x_host.itemsize
    dtype = str(x_host.dtype)
    results: list[Result] = []
    failures: list[str] = []

    def record(op: str, path: str, seconds: float, nbytes: int, naive: float | None) -> None:
        rate = nbytes / seconds
        results.append(
            Result(
                op=op,
                backend=lib.name,
                shape=shape.name,
                dtype=dtype,
                path=path,
                median_ms=1e3 * seconds,
                bytes=nbytes,
                gb_per_s=rate / 1e9,
                bw_efficiency=rate / copy_bytes_per_s,
                vs_naive=None if naive is None else naive / seconds,
            )
        )

    def real_rows(routing: mr.Routing) -> int:
        return int(np.count_nonzero(lib.to_numpy(routing.expert_ids) >= 0))

    thresholds = lib.asarray(np.full(experts, 1.0 / experts, np.float32))
    routers: list[tuple[str, Callable[[], mr.Routing], int]] = [
        ("route TopK", lambda: mr.TopK(experts, k)(logits), experts),
        ("route TopP(0.4)", lambda: mr.TopP(experts, 0.4, k)(logits), experts),
        ("route ReLURouting", lambda: mr.ReLURouting(experts, k)(logits), experts),
        (
            "route CausalExpertChoice",
            lambda: mr.CausalExpertChoice(experts, float(k))(logits, thresholds),
            experts,
        ),
        (
            f"route NullExperts(+{num_null})",
            lambda: mr.NullExperts(experts, num_null, k)(null_logits),
            experts + num_null,
        ),
        ("route ExpertChoice", lambda: mr.ExpertChoice(experts, float(k))(logits), experts),
    ]
    for op, route, columns in routers:
        seconds = _median_seconds(route, lambda r: lib.sync(r.weights), repeat)
        nbytes = router_bytes(tokens=tokens, columns=columns, rows=real_rows(route()))
        record(op, "agnostic", seconds, nbytes, None)

    routing = mr.TopK(experts, k)(logits)
    rows = real_rows(routing)
    plan = mr.make_plan(routing)
    num_valid = int(lib.to_numpy(plan.num_valid))
    sources = plan.source_tokens[:num_valid]
    tokens_read = int(np.unique(lib.to_numpy(sources)).size)
    order = lib.to_numpy(plan.order)[:num_valid]
    weights = lib.asarray(lib.to_numpy(routing.weights)[order])
    ye = lib.asarray(lib.to_numpy(mr.dispatch(x, plan)))
    valid_ye = ye[:num_valid]

    nbytes = plan_bytes(tokens=tokens, rows=rows, fan_in=routing.fan_in)
    for variant in _variants("make_plan", routing.expert_ids, paths):
        with variant:
            seconds = _median_seconds(
                lambda: mr.make_plan(routing), lambda p: lib.sync(p.combine_rows), repeat
            )
        record("make_plan", variant.name, seconds, nbytes, None)

    # Each variant is checked against the one-liner before either is timed.
    expected = lib.to_numpy(lib.naive_dispatch(x, sources))
    nbytes = dispatch_bytes(tokens_read=tokens_read, rows=rows, dim=dim, itemsize=itemsize)
    naive = _median_seconds(lambda: lib.naive_dispatch(x, sources), lib.sync, repeat)
    for variant in _variants("dispatch", x, paths):
        with variant:
            if not np.array_equal(lib.to_numpy(mr.dispatch(x, plan))[:num_valid], expected):
                failures.append(f"dispatch {variant.name} {lib.name} {shape.name}: != x[idx]")
            seconds = _median_seconds(lambda: mr.dispatch(x, plan), lib.sync, repeat)
        record("dispatch", variant.name, seconds, nbytes, naive)
    record("dispatch naive x[idx]", "baseline", naive, nbytes, naive)

    # Combine of the dispatched rows (identity experts): y[t] = sum of t's weights * x[t].
    expected = lib.to_numpy(lib.naive_combine(valid_ye, sources, weights, tokens))
    nbytes = combine_bytes(tokens=tokens, rows=rows, dim=dim, itemsize=itemsize)
    naive = _median_seconds(
        lambda: lib.naive_combine(valid_ye, sources, weights, tokens), lib.sync, repeat
    )
    for variant in _variants("combine", ye, paths):
        with variant:
            combined = lib.to_numpy(mr.combine(ye, plan))
            if not np.allclose(combined, expected, rtol=1e-5, atol=1e-5):
                failures.append(f"combine {variant.name} {lib.name} {shape.name}: != scatter-add")
            seconds = _median_seconds(lambda: mr.combine(ye, plan), lib.sync, repeat)
        record("combine", variant.name, seconds, nbytes, naive)
    naive_name = "np.add.at" if lib.name == "numpy" else "index_add_"
    record(f"combine naive {naive_name}", "baseline", naive, nbytes, naive)
    return results, failures


# ----------------------------------------------------------------------------------- routers

#: ``--router`` shapes (T, E, k) by ``--shape``: issue 16's table for ``all``.
ROUTER_SHAPES: dict[str, list[tuple[int, int, int]]] = {
    "ci-tiny": [(64, 8, 2)],
    "mixtral": [(4096, 8, 2)],
    "olmoe": [(4096, 64, 8)],
    "all": [(4096, 8, 2), (4096, 64, 8), (16384, 64, 8), (65536, 64, 8)],
}


def _eager_router(library: str, k: int) -> tuple[str, Callable[[Any], Any]]:
    """The top-k router a user would write by hand in ``library`` (no exact ties, no checks)."""
    if library == "numpy":

        def numpy_router(logits: Any) -> Any:
            exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = exp / exp.sum(axis=-1, keepdims=True)
            chosen = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
            weights = np.take_along_axis(probs, chosen, axis=-1)
            return chosen, weights / weights.sum(axis=-1, keepdims=True)

        return "softmax+argpartition", numpy_router
    if library == "torch":
        import torch

        def torch_router(logits: Any) -> Any:
            weights, chosen = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
            return chosen, weights / weights.sum(dim=-1, keepdim=True)

        return "softmax+topk+renorm", torch_router
    import jax

    # Typed where JAX is installed, untyped in the lint environment, which has no JAX.
    @jax.jit  # type: ignore[untyped-decorator, unused-ignore]
    def jax_router(logits: Any) -> Any:
        weights, chosen = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
        return chosen, weights / weights.sum(axis=-1, keepdims=True)

    return "jit(softmax+top_k)", jax_router


def _router_policies(experts: int, k: int, rng: np.random.Generator) -> list[tuple[str, Any, int]]:
    """(name, policy, logits columns); DeepSeekTopK gets a selection bias."""
    num_null = max(1, experts // 2)
    groups = min(8, experts)
    return [
        ("TopK", mr.TopK(experts, k), experts),
        (f"NullExperts(+{num_null})", mr.NullExperts(experts, num_null, k), experts + num_null),
        ("DeepSeekTopK+bias", mr.DeepSeekTopK(experts, k), experts),
        (
            f"DeepSeekTopK groups {groups}/{max(1, groups // 2)}",
            mr.DeepSeekTopK(experts, k, num_groups=groups, topk_groups=max(1, groups // 2)),
            experts,
        ),
        ("GShardTop2", mr.GShardTop2(experts, second_expert_policy="all"), experts),
    ]


def router_table(
    libraries: Sequence[str],
    shape_name: str,
    repeat: int,
    seed: int,
    paths: Sequence[str] = ("kernel", "agnostic"),
) -> list[dict[str, Any]]:
    """Each token-choice router against the hand-written eager router, in one run.

    ``vs eager`` is eager time / router time (above 1: the router is faster), the two timed in
    alternation on the same logits (the eager code reads every column, null ones included). JAX
    runs both under ``jax.jit``. ``path`` "kernel" is what the registry picks, "agnostic" the
    reference.
    """
    rows: list[dict[str, Any]] = []
    for library in libraries:
        for tokens, experts, k in ROUTER_SHAPES[shape_name]:
            rng = np.random.default_rng(seed)
            eager_name, eager = _eager_router(library, k)
            convert, sync, wrap = _router_library(library)
            for name, policy, columns in _router_policies(experts, k, rng):
                logits = convert(rng.standard_normal((tokens, columns), dtype=np.float32))
                extra = (
                    (convert((rng.standard_normal(experts) * 0.01).astype(np.float32)),)
                    if name.startswith("DeepSeekTopK+bias")
                    else ()
                )
                for path in paths:
                    with _Variant(path, force_reference=path == "agnostic"):
                        route = wrap(policy)
                        seconds, eager_s = paired_median_seconds(
                            functools.partial(route, logits, *extra),
                            functools.partial(eager, logits),
                            sync,
                            repeat,
                        )
                    rows.append(
                        {
                            "backend": library,
                            "T,E,k": f"{tokens},{experts},{k}",
                            "router": name,
                            "path": path,
                            "ms": 1e3 * seconds,
                            "eager": eager_name,
                            "eager_ms": 1e3 * eager_s,
                            "vs_eager": eager_s / seconds,
                        }
                    )
    return rows


def _router_library(library: str) -> tuple[Callable[..., Any], Callable[[Any], None], Any]:
    """(NumPy -> array, wait for a result, wrap a policy: jax.jit on JAX) for ``library``."""
    if library == "numpy":
        return np.asarray, lambda _: None, lambda policy: policy
    if library == "torch":
        import torch

        return torch.from_numpy, lambda _: None, lambda policy: policy
    import jax

    # Makes Routing a pytree even when MOEROUTER_BACKEND=reference keeps the plugin unloaded.
    importlib.import_module("moerouter_jax")

    def block(result: Any) -> None:
        jax.block_until_ready(result)  # type: ignore[no-untyped-call, unused-ignore]

    # A fresh jit per path: the trace reads MOEROUTER_BACKEND once.
    return jax.numpy.asarray, block, lambda policy: jax.jit(lambda *a: policy(*a))


def _format_router_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'backend':<7} {'T,E,k':<11} {'router':<28} {'path':<8} {'ms':>9} "
        f"{'eager':<21} {'eager ms':>9} {'vs eager':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['backend']:<7} {r['T,E,k']:<11} {r['router']:<28} {r['path']:<8} "
            f"{r['ms']:>9.3f} {r['eager']:<21} {r['eager_ms']:>9.3f} {r['vs_eager']:>8.2f}x"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- table


def _format_table(results: Sequence[Result]) -> str:
    header = (
        f"{'op':<28} {'backend':<8} {'shape':<8} {'dtype':<8} {'path':<9} "
        f"{'median ms':>10} {'GB/s':>8} {'bw_eff':>7} {'vs naive':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        speedup = "-" if r.vs_naive is None else f"{r.vs_naive:.2f}x"
        lines.append(
            f"{r.op:<28} {r.backend:<8} {r.shape:<8} {r.dtype:<8} {r.path:<9} "
            f"{r.median_ms:>10.3f} {r.gb_per_s:>8.2f} {r.bw_efficiency:>7.3f} {speedup:>9}"
        )
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moerouter bench",
        description="Routing, plan, dispatch and combine timings against the same-run copy roof.",
        epilog="bw_efficiency = (minimal_bytes / time) / copy bandwidth; "
        "'vs naive' = naive time / op time. Use asv (asv_bench/) for history.",
    )
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="ci-tiny")
    parser.add_argument("--backend", choices=["numpy", "torch", "jax", "all"], default="all")
    parser.add_argument("--repeat", type=_positive, default=5, help="timed runs per op (median)")
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)"
    )
    parser.add_argument(
        "--roof-mib", type=_positive, default=256, help="copy roof buffer size (MiB)"
    )
    parser.add_argument(
        "--path",
        choices=["auto", "agnostic", "both"],
        default="both",
        help="auto: the kernel the registry picks; agnostic: force the array-API reference "
        "(MOEROUTER_BACKEND=reference); both: each, where a backend has a kernel "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--router",
        action="store_true",
        help="time each token-choice router against the eager top-k a user would write "
        "(numpy, torch, jax under jit); --shape all: T,E,k = 4096,8,2 / 4096,64,8 / "
        "16384,64,8 / 65536,64,8",
    )
    parser.add_argument(
        "--step",
        action="store_true",
        help="a whole MoE routing step (router, losses, plan, dispatch, combine; identity "
        "experts) on torch CPU against transformers' OLMoE block; --shape all ends at "
        "T,E,k,d = 16384,64,8,2048 (also --shape olmoe)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written as a file, or None; probes its folder with a temporary file
    (the path itself is left as it is)."""
    target = Path(path)
    if target.is_dir():
        return "it is a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".moerouter-bench-"):
            pass
    except OSError as error:
        return f"folder {str(target.parent)!r}: {error.strerror or error}"
    if target.exists() and not os.access(target, os.W_OK):
        return "the file is read-only"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark table; 0 on success, 1 if an op disagreed with its naive baseline."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--"]:  # ``python -m moerouter bench -- --shape olmoe``
        arguments = arguments[1:]
    parser = _parser()
    args = parser.parse_args(arguments)
    if args.json:
        problem = _unwritable(args.json)
        if problem:  # found now, not after the whole benchmark has run
            parser.error(f"--json {args.json!r} cannot be written: {problem}")
    if args.router:
        return _router_main(args)
    if args.step:
        from moerouter._bench_step import step_main

        return step_main(args)
    shapes = list(SHAPES.values()) if args.shape == "all" else [SHAPES[args.shape]]
    libraries, skipped = _libraries(args.backend, args.device)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"moerouter {mr.__version__} bench: python {platform.python_version()}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}"
    )
    for reason in skipped:
        print(f"skipped {reason}")
    if not libraries:
        print("no backend to benchmark", file=sys.stderr)
        return 1

    results: list[Result] = []
    failures: list[str] = []
    roofs: dict[str, float] = {}
    for lib in libraries:
        roof_bytes = args.roof_mib * 2**20
        seconds = lib.copy_seconds(roof_bytes, args.repeat)
        roofs[lib.name] = 2 * roof_bytes / seconds  # a copy reads and writes every byte
        print(
            f"copy roof {lib.name} {lib.version}: {roofs[lib.name] / 1e9:.2f} GB/s "
            f"({args.roof_mib} MiB, read + write, median of {args.repeat})"
        )
        for shape in shapes:
            rows, failed = _bench_shape(
                lib, shape, args.repeat, roofs[lib.name], args.seed, args.path
            )
            results.extend(rows)
            failures.extend(failed)
    print()
    print(_format_table(results))
    print(
        "\nbw_eff = (minimal bytes / time) / copy roof of the same backend; minimal bytes: each "
        "routed token read once, R rows written (dispatch), R rows read, T written (combine)."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {"copy_roof_bytes_per_s": roofs, "results": [asdict(r) for r in results]},
                handle,
                indent=1,
            )
    for failure in failures:
        print(f"MISMATCH: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _router_main(args: argparse.Namespace) -> int:
    wanted = ["numpy", "torch", "jax"] if args.backend == "all" else [args.backend]
    libraries = []
    for library in wanted:
        try:
            __import__(library)
        except ImportError:
            print(f"skipped {library}: not installed")
            continue
        libraries.append(library)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"moerouter {mr.__version__} bench --router: python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}; median of {args.repeat}"
    )
    paths = {"auto": ("kernel",), "agnostic": ("agnostic",)}.get(args.path, ("kernel", "agnostic"))
    rows = router_table(libraries, args.shape, args.repeat, args.seed, paths)
    print(_format_router_table(rows))
    print(
        "\nvs eager = eager time / router time, the two timed in alternation on the same logits "
        "(> 1: faster)."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"routers": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
