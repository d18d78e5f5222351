"""``python -m moerouter demo | bench | info``.

- ``demo``: routes one synthetic batch through every policy on every installed backend and prints
  the routing statistics, checking that each backend decides exactly as NumPy does.
- ``bench``: dispatch/combine/router timings against the same-run copy roof.
- ``info``: backends found, versions and devices.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import _registry

__all__ = ["main"]

_LIBRARIES = ("numpy", "array_api_compat", "array_api_strict", "torch", "jax", "cupy", "triton")


def _version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        return str(getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as error:  # an installed but broken library is worth reporting, not dying on
        return f"fails to import ({type(error).__name__}: {error})"


def _devices(library: str) -> str:
    try:
        if library == "torch":
            import torch

            gpus = torch.cuda.device_count()
            return "cpu" + (f", {gpus} cuda ({torch.cuda.get_device_name(0)})" if gpus else "")
        if library == "jax":
            import jax

            return ", ".join(sorted({str(d.platform) for d in jax.devices()}))
        if library == "cupy":
            import cupy

            return f"{cupy.cuda.runtime.getDeviceCount()} cuda"
    except Exception as error:
        return f"unavailable ({type(error).__name__})"
    return "cpu"


def info(_: argparse.Namespace) -> int:
    """Print versions, the plugins moerouter can load, and the devices each library sees."""
    print(f"moerouter {mr.__version__}  (python {sys.version.split()[0]})\n")
    print("libraries:")
    for name in _LIBRARIES:
        print(f"  {name:<18} {_version(name)}")
    print("\nbackend plugins:")
    for library, target in _registry.known_plugins().items():
        module = target.partition(":")[0]
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            print(f"  {library:<8} {target:<32} not installed")
            continue
        try:
            plugin = _registry._import_plugin(target)
        except Exception as error:
            print(f"  {library:<8} {target:<32} fails to load: {error}")
            continue
        kernels = ", ".join(sorted(plugin.kernels)) or "none (agnostic path)"
        devices = _devices(library) if importlib.util.find_spec(library) else "library missing"
        print(f"  {library:<8} {target:<32} kernels: {kernels}; devices: {devices}")
    return 0


# --------------------------------------------------------------------------------------- demo


def _demo_backends() -> list[tuple[str, Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]]:
    """(name, numpy -> array, array -> numpy) for every backend that can run here."""
    from moerouter.testing import Backend, to_numpy

    found: list[tuple[str, Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]] = []
    for backend in Backend:
        if backend.unavailable_reason() is None:
            found.append((backend.value, backend.asarray, to_numpy))
    return found


def _synthetic_logits(tokens: int, columns: int, seed: int) -> np.ndarray:
    """Router logits with a realistic skew: some experts popular, tokens of varying confidence."""
    rng = np.random.default_rng(seed)
    popularity = np.linspace(1.0, -1.0, columns)
    confidence = rng.uniform(0.5, 3.0, size=(tokens, 1))
    logits = popularity + confidence * rng.standard_normal((tokens, columns))
    return logits.astype(np.float32)


LEGEND = """
experts/tok  real experts per token (expert FLOPs scale with it)
load CV      balance of tokens over experts (std / mean), with max/mean
dropped      choices over capacity;  null: choices of a null expert
aux loss     load_balancing, Megatron convention (1.0 = uniform)
ms           route + plan + dispatch + combine + stats, second call, eager"""


def demo(args: argparse.Namespace) -> int:
    """Route a synthetic batch with every policy on every backend; print the statistics."""
    experts, tokens = args.experts, args.tokens
    policies: list[tuple[str, Any, int]] = [
        ("top-1 (Switch)", mr.TopK(experts, 1, normalize=False), experts),
        ("top-2 (Mixtral)", mr.TopK(experts, 2), experts),
        ("top-2, capacity 1.0", mr.TopK(experts, 2, capacity_factor=1.0), experts),
        ("top-2 sigmoid", mr.TopK(experts, 2, score="sigmoid"), experts),
        (f"AdaMoE {experts}+{experts} null, k=4", mr.NullExperts(experts, experts, 4), 2 * experts),
        (
            f"AdaMoE {experts}+{2 * experts} null, k=4",
            mr.NullExperts(experts, 2 * experts, 4),
            3 * experts,
        ),
        ("expert choice, cf 2", mr.ExpertChoice(experts, 2.0), experts),
    ]
    backends = _demo_backends()
    rng = np.random.default_rng(args.seed)
    features = rng.standard_normal((tokens, args.dim)).astype(np.float32)
    print(
        f"moerouter demo: {tokens} tokens, d={args.dim}, {experts} experts, seed {args.seed}; "
        f"backends: {', '.join(name for name, _, _ in backends)}\n"
    )
    header = (
        f"{'policy':<28} {'backend':<17} {'experts/tok':>11} {'load CV':>8} {'max/mean':>8} "
        f"{'dropped':>8} {'null':>6} {'entropy':>8} {'aux loss':>9} {'ms':>7}  same as numpy"
    )
    print(header)
    print("-" * len(header))
    all_agree = True
    for label, policy, columns in policies:
        logits = _synthetic_logits(tokens, columns, args.seed)
        reference_ids: np.ndarray | None = None
        reference_y: np.ndarray | None = None
        for name, to_backend, to_host in backends:
            x, logits_here = to_backend(features), to_backend(logits)
            for _ in range(2):  # the second, timed, pass is past one-time tracing and caching
                started = time.perf_counter()
                routing = policy(logits_here)
                plan = mr.make_plan(routing)
                y = mr.combine(mr.dispatch(x, plan), plan)  # identity experts
                stats = {key: to_host(value) for key, value in mr.stats.summary(routing).items()}
                aux = float(to_host(mr.losses.load_balancing(routing)))
                elapsed_ms = 1e3 * (time.perf_counter() - started)
            ids, y_host = to_host(routing.expert_ids), to_host(y)
            if reference_ids is None or reference_y is None:
                reference_ids, reference_y, agree = ids, y_host, "(reference)"
            else:
                same = np.array_equal(ids, reference_ids) and np.allclose(
                    y_host, reference_y, rtol=1e-5, atol=1e-5
                )
                all_agree &= same
                agree = "yes" if same else "NO"
            print(
                f"{label:<28} {name:<17} {float(stats['real_experts_per_token']):>11.3f} "
                f"{float(stats['load_cv']):>8.3f} {float(stats['load_max_over_mean']):>8.2f} "
                f"{float(stats['dropped_fraction']):>8.1%} {float(stats['null_fraction']):>6.1%} "
                f"{float(stats['router_entropy']):>8.3f} {aux:>9.4f} {elapsed_ms:>7.1f}  {agree}"
            )
    print(LEGEND)
    if not all_agree:
        print("\nsome backend decided differently from numpy: please report this", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options: hand them over untouched
        from moerouter._bench import main as bench_main

        result: int = bench_main(argv[1:])
        return result
    description = "moerouter: demo, benchmarks and environment report"
    parser = argparse.ArgumentParser(prog="python -m moerouter", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="route a synthetic batch with every policy")
    demo_parser.add_argument("--tokens", type=_positive, default=4096)
    demo_parser.add_argument("--dim", type=_positive, default=256)
    demo_parser.add_argument("--experts", type=_positive, default=8)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(run=demo)
    commands.add_parser("bench", help="kernel timings against the copy roof (bench --help)")
    commands.add_parser("info", help="backends, versions, devices").set_defaults(run=info)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
