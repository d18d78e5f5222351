"""Benchmark the NumPy kernels against the same run's ``np.copyto`` and the agnostic path.

Run ``python tests/kernels/numpy/bench_numpy.py`` (default: the OLMoE-like shape T=4096, d=2048,
E=64, k=8, float32). Not collected by pytest: timings are benchmarks, never test assertions.

Metric (DESIGN.md): ``bw_efficiency = (minimal_bytes / time) / copy_bandwidth``. Minimal bytes
count each input row read once and each output row written once, with R = real rows only:
dispatch and combine both move ``(T + R) * d * itemsize`` bytes. ``copy_bandwidth`` is
``2 * nbytes / time`` of a single-threaded ``np.copyto`` into a preallocated array of ``R * d``
elements (read + write), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import _benchlib, _numpy_backend, _registry
from moerouter._agnostic import plan as agnostic


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    return _benchlib.median_seconds(fn, repeat=repeats, warmup=warmup)


def copy_seconds(shape: tuple[int, int], dtype: np.dtype[Any], repeats: int) -> float:
    """The copy roof: one ``np.copyto`` between preallocated arrays."""
    source = np.random.default_rng(1).standard_normal(shape, dtype=np.float32).astype(dtype)
    target = np.empty_like(source)
    return median_seconds(lambda: np.copyto(target, source), repeats)


def interleaved_efficiency(
    x: np.ndarray, ye: np.ndarray, plan: mr.Plan, moved: int, repeats: int
) -> dict[str, float]:
    """Copy, dispatch and combine in turn, ``repeats`` rounds: each round's efficiencies use that
    round's copy, so a busy machine (shared CI runners) slows roof and kernel alike. Returns the
    median over rounds."""
    source = (
        np.random.default_rng(1)
        .standard_normal((plan.num_rows, x.shape[1]), dtype=np.float32)
        .astype(x.dtype)
    )
    target = np.empty_like(source)
    rounds: dict[str, list[float]] = {"copy_GBps": [], "dispatch": [], "combine": []}
    for round_index in range(repeats + 2):
        start = time.perf_counter()
        np.copyto(target, source)
        copy_bw = 2 * source.nbytes / (time.perf_counter() - start)
        start = time.perf_counter()
        mr.dispatch(x, plan)
        dispatch_s = time.perf_counter() - start
        start = time.perf_counter()
        mr.combine(ye, plan)
        combine_s = time.perf_counter() - start
        if round_index >= 2:  # warm-up rounds
            rounds["copy_GBps"].append(copy_bw / 1e9)
            rounds["dispatch"].append(moved / dispatch_s / copy_bw)
            rounds["combine"].append(moved / combine_s / copy_bw)
    return {
        "copy_GBps": float(np.median(rounds["copy_GBps"])),
        "dispatch_bw_efficiency": float(np.median(rounds["dispatch"])),
        "combine_bw_efficiency": float(np.median(rounds["combine"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.environ.pop("MOEROUTER_BACKEND", None)
    _registry.reset()

    T, d, E, k = args.tokens, args.features, args.experts, args.k
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((T, E), dtype=np.float32)
    x = rng.standard_normal((T, d), dtype=np.float32).astype(dtype)
    routing = mr.TopK(num_experts=E, k=k)(logits)
    plan = mr.make_plan(routing)
    R = plan.num_rows
    real_rows = int(plan.num_valid)
    ye = rng.standard_normal((R, d), dtype=np.float32).astype(dtype)
    item = dtype.itemsize
    moved = (T + real_rows) * d * item
    result: dict[str, Any] = {
        "shape": {"T": T, "d": d, "E": E, "k": k, "dtype": str(dtype)},
        "threads": _numpy_backend._num_threads(),
    }

    copy_s = copy_seconds((R, d), dtype, args.repeats)
    copy_bw = 2 * R * d * item / copy_s
    result["copy"] = {"ms": copy_s * 1e3, "GBps": copy_bw / 1e9}
    result["interleaved"] = interleaved_efficiency(x, ye, plan, moved, args.repeats)

    def row(seconds: float, reference_seconds: float | None = None) -> dict[str, float]:
        entry = {
            "ms": seconds * 1e3,
            "GBps": moved / seconds / 1e9,
            "bw_efficiency": moved / seconds / copy_bw,
        }
        if reference_seconds is not None:
            entry["speedup_vs_agnostic"] = reference_seconds / seconds
        return entry

    xp = np  # the agnostic path on NumPy arrays
    plan_ref_s = median_seconds(
        lambda: agnostic.plan_arrays(
            routing.token_ids,
            routing.expert_ids,
            routing.weights,
            num_tokens=T,
            num_experts=E,
            fan_in=k,
            token_layout=True,
            xp=xp,
            device="cpu",
        ),
        args.repeats,
    )
    plan_s = median_seconds(lambda: _numpy_backend.make_plan(routing), args.repeats)
    result["make_plan"] = {
        "ms": plan_s * 1e3,
        "agnostic_ms": plan_ref_s * 1e3,
        "speedup_vs_agnostic": plan_ref_s / plan_s,
    }

    dispatch_ref_s = median_seconds(
        lambda: agnostic.dispatch(x, plan.source_tokens, plan.num_valid, xp=xp), args.repeats
    )
    result["dispatch"] = row(
        median_seconds(lambda: mr.dispatch(x, plan), args.repeats), dispatch_ref_s
    )
    buffer = np.empty((R, d), dtype)
    result["dispatch_out"] = row(
        median_seconds(lambda: _numpy_backend.dispatch(x, plan, out=buffer), args.repeats)
    )
    os.environ["MOEROUTER_NUMPY_CACHE_MB"] = "0"
    result["dispatch_uncached"] = row(median_seconds(lambda: mr.dispatch(x, plan), args.repeats))
    os.environ["MOEROUTER_NUM_THREADS"] = "1"
    result["dispatch_uncached_1thread"] = row(
        median_seconds(lambda: mr.dispatch(x, plan), args.repeats)
    )
    del os.environ["MOEROUTER_NUMPY_CACHE_MB"]
    result["dispatch_1thread"] = row(median_seconds(lambda: mr.dispatch(x, plan), args.repeats))
    del os.environ["MOEROUTER_NUM_THREADS"]
    _numpy_backend.clear_cache()

    combine_ref_s = median_seconds(
        lambda: agnostic.combine(ye, plan.combine_rows, plan.combine_weights, xp=xp),
        args.repeats,
    )
    result["combine"] = row(
        median_seconds(lambda: mr.combine(ye, plan), args.repeats), combine_ref_s
    )
    rows, weights, counts = _numpy_backend._packed_entries(plan)
    output = np.empty((T, d), dtype)
    result["combine_blocked_matmul"] = row(
        median_seconds(
            lambda: _numpy_backend._combine_blocked(ye, rows, weights, counts, output),
            args.repeats,
        ),
        combine_ref_s,
    )
    if args.json:
        print(json.dumps(result))
        return
    print(f"shape {result['shape']}, threads {result['threads']}")
    print(f"np.copyto roof: {result['copy']['GBps']:.2f} GB/s ({result['copy']['ms']:.2f} ms)")
    inter = result["interleaved"]
    print(
        f"interleaved rounds (copy {inter['copy_GBps']:.2f} GB/s): dispatch bw_efficiency "
        f"{inter['dispatch_bw_efficiency']:.2f}, combine {inter['combine_bw_efficiency']:.2f}"
    )
    mp = result["make_plan"]
    print(
        f"make_plan: {mp['ms']:.2f} ms (agnostic {mp['agnostic_ms']:.2f} ms, "
        f"{mp['speedup_vs_agnostic']:.1f}x)"
    )
    for name, entry in result.items():
        if isinstance(entry, dict) and "bw_efficiency" in entry:
            speedup = entry.get("speedup_vs_agnostic")
            extra = f", {speedup:.1f}x agnostic" if speedup else ""
            print(
                f"{name:28s} {entry['ms']:8.2f} ms {entry['GBps']:6.2f} GB/s "
                f"bw_efficiency {entry['bw_efficiency']:.2f}{extra}"
            )


if __name__ == "__main__":
    main()
