"""GPU benchmark of the CuPy kernels against the same run's device copy (needs CuPy and a GPU).

``python backends/cupy/bench_cupy.py [--tokens 4096 --features 2048 --experts 64 --k 8]``

Reports, per kernel, the median time over CUDA-event-timed repeats, GB/s from minimal bytes
(``(T + R_real) * d * itemsize`` for dispatch and combine) and ``bw_efficiency`` against a
device-to-device copy of the same ``R * d`` elements (``2 * nbytes / time``), plus the fused
router's speedup over CuPy softmax + argpartition. Rows are float16 (CuPy has no bfloat16
dtype; the kernels move bfloat16 the same way, as 2-byte words).
"""

from __future__ import annotations

import argparse
import json
import os

import cupy
import moerouter_cupy

import moerouter as mr
from moerouter import _benchlib

# The kernels are what this measures: their set is off until it has passed on a GPU.
os.environ.setdefault("MOEROUTER_UNVERIFIED_KERNELS", "cupy-cuda")


def event_seconds(fn):
    """One call of ``fn`` timed by CUDA events on the current stream."""
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3


def median_ms(fn, repeats=50, warmup=5):
    return 1e3 * _benchlib.median_seconds(fn, repeat=repeats, warmup=warmup, timer=event_seconds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    T, d, E, k = args.tokens, args.features, args.experts, args.k
    rng = cupy.random.default_rng(0)
    logits = rng.standard_normal((T, E), dtype=cupy.float32)
    x = rng.standard_normal((T, d), dtype=cupy.float32).astype(cupy.float16)
    routing = moerouter_cupy.topk_router(logits, k=k)
    plan = mr.make_plan(routing)
    R = plan.num_rows
    real = int(plan.num_valid)
    ye = rng.standard_normal((R, d), dtype=cupy.float32).astype(cupy.float16)
    source, target = cupy.empty_like(ye), cupy.empty_like(ye)
    copy_ms = median_ms(lambda: cupy.copyto(target, source))
    copy_bw = 2 * source.nbytes / (copy_ms / 1e3)
    moved = (T + real) * d * x.dtype.itemsize
    result = {"shape": [T, d, E, k], "copy_GBps": copy_bw / 1e9}
    for name, fn in [
        ("dispatch", lambda: mr.dispatch(x, plan)),
        ("combine", lambda: mr.combine(ye, plan)),
    ]:
        ms = median_ms(fn)
        result[name] = {
            "ms": ms,
            "GBps": moved / (ms / 1e3) / 1e9,
            "bw_efficiency": moved / (ms / 1e3) / copy_bw,
        }
    result["make_plan_ms"] = median_ms(lambda: mr.make_plan(routing))
    fused = median_ms(lambda: moerouter_cupy.topk_router(logits, k=k))

    def unfused():
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = cupy.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        top = cupy.argpartition(-probs, k - 1, axis=1)[:, :k]
        chosen = cupy.take_along_axis(probs, top, axis=1)
        return top, chosen / chosen.sum(axis=1, keepdims=True)

    baseline = median_ms(unfused)
    result["router"] = {"fused_ms": fused, "softmax_argpartition_ms": baseline,
                        "speedup": baseline / fused}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
