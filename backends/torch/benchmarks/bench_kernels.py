"""CPU benchmark of the torch kernels against the same-run copy roof and naive baselines.

    python backends/torch/benchmarks/bench_kernels.py [--reps 7] [--shapes olmoe mixtral]

For each shape and dtype: median times of make_plan, dispatch, combine; achieved GB/s on the
minimal bytes ``(T + R) * d * itemsize`` per direction (each input row read once, each output
row written once, R = real rows); ``bw_efficiency`` = GB/s / copy GB/s measured in the same run;
and the ratio of dispatch+combine time against (a) naive ``x[idx]`` + ``index_add_``, (b) a
per-expert loop as in transformers' ``MixtralSparseMoeBlock`` (identity experts: data movement
only) and (c) GShard's dense one-hot dispatch and combine, ``einsum("tec,td->ecd")`` and
``einsum("tec,ecd->td")`` with (T, E, C) masks, C = capacity (``--capacity-factor``). The one-hot
einsums are matmuls of 2*T*E*C*d FLOPs each: probes on a few tokens estimate their time first,
and a shape whose estimate exceeds ``--einsum-budget`` seconds is skipped with the estimate printed;
one whose masks do not fit in half the available memory falls back to capacity factor 1.0, then
is skipped. Timings are benchmarks, never assertions.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

import moerouter as mr
from moerouter import _benchlib

SHAPES = {
    "olmoe": (4096, 2048, 64, 8),
    "mixtral": (4096, 4096, 8, 2),
}


#: Tokens of the first one-hot einsum probe, which estimates the full einsums' time.
PROBE_TOKENS = 8


def median_seconds(fn, reps: int, warmup: int = 5) -> float:
    # The first few calls of a process pay one-off costs (thread pools, allocator growth).
    return _benchlib.median_seconds(fn, repeat=reps, warmup=warmup)


def copy_gbps(reps: int) -> float:
    source = torch.empty(1 << 29, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source).fill_(0)
    return (
        _benchlib.copy_bandwidth(
            lambda: target.copy_(source), source.numel(), repeat=reps, warmup=5
        )
        / 1e9
    )


def naive(x, ye, token_ids, weights, expert_ids):
    """``x[idx]`` and ``index_add_``: what a first MoE implementation writes."""
    real = expert_ids >= 0
    tokens = token_ids[real].long()

    def dispatch():
        return x[tokens]

    def combine():
        out = torch.zeros(x.shape, dtype=torch.float32)
        out.index_add_(0, tokens, ye[: tokens.shape[0]].float() * weights[real, None])
        return out.to(x.dtype)

    return dispatch, combine


def per_expert_loop(x, routing, num_experts, k):
    """transformers' MixtralSparseMoeBlock loop with identity experts."""
    selected = routing.expert_ids.reshape(-1, k).long()
    weights = routing.weights.reshape(-1, k)

    def run():
        final = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(selected.clamp(min=0), num_experts).permute(2, 1, 0)
        for expert in range(num_experts):
            slot, token = torch.where(mask[expert])
            current = x[token] * weights[token, slot, None].to(x.dtype)
            final.index_add_(0, token, current)
        return final

    return run


def available_bytes() -> int:
    """Memory the benchmark may still use (physical memory not in use)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gshard_capacity(tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """GShard/Switch expert capacity: ``ceil(capacity_factor * T * k / E)`` rows per expert."""
    return math.ceil(capacity_factor * tokens * k / num_experts)


def one_hot_bytes(tokens, width, num_experts, capacity, itemsize) -> int:
    """Peak bytes of the one-hot baseline: two (T, E, C) masks and the (E, C, d) expert input."""
    return (2 * tokens * num_experts + num_experts * width) * capacity * itemsize


def one_hot_masks(expert_ids, weights, num_experts, capacity, dtype):
    """GShard's dense ``(combine_weights, dispatch_mask)``, both (T, E, C) in ``dtype``.

    An assignment's position in its expert is the number of earlier assignments to that expert,
    counted slot-major (every token's first choice before any second choice, as in GShard and
    Switch); positions ``>= capacity`` are dropped. Returns the masks and the drop count.
    """
    tokens, k = expert_ids.shape
    slot_major = expert_ids.T.reshape(-1).long()
    one_hot = torch.nn.functional.one_hot(slot_major, num_experts)
    position = (torch.cumsum(one_hot, 0) * one_hot).sum(1) - 1
    kept = position < capacity
    where = (torch.arange(tokens).repeat(k)[kept], slot_major[kept], position[kept])
    combine_weights = torch.zeros((tokens, num_experts, capacity), dtype=dtype)
    combine_weights[where] = weights.T.reshape(-1)[kept].to(dtype)
    dispatch_mask = torch.zeros((tokens, num_experts, capacity), dtype=dtype)
    dispatch_mask[where] = 1
    return combine_weights, dispatch_mask, int((~kept).sum())


def one_hot_einsum(x, combine_weights, dispatch_mask):
    """GShard's dispatch and combine: two dense matmuls over the one-hot masks."""

    def run():
        expert_inputs = torch.einsum("tec,td->ecd", dispatch_mask, x)
        return torch.einsum("tec,ecd->td", combine_weights, expert_inputs)

    return run


def one_hot_baseline(x, routing, num_experts, k, capacity_factor, budget, reps):
    """(seconds or None, mask-building seconds or None, note) for GShard's one-hot einsums."""
    tokens, width = x.shape
    expert_ids = routing.expert_ids.reshape(-1, k)
    weights = routing.weights.reshape(-1, k)
    notes = []
    capacity = gshard_capacity(tokens, num_experts, k, capacity_factor)
    need = one_hot_bytes(tokens, width, num_experts, capacity, x.element_size())
    if need > available_bytes() // 2 and capacity_factor != 1.0:
        notes.append(
            f"masks need {need / 1e9:.1f} GB at capacity factor {capacity_factor}: "
            "capacity factor 1.0 used"
        )
        capacity_factor = 1.0
        capacity = gshard_capacity(tokens, num_experts, k, capacity_factor)
        need = one_hot_bytes(tokens, width, num_experts, capacity, x.element_size())
    if need > available_bytes() // 2:
        notes.append(
            f"skipped: masks need {need / 1e9:.1f} GB, over half the available "
            f"{available_bytes() / 1e9:.1f} GB"
        )
        return None, None, "; ".join(notes)
    notes.append(f"C={capacity} (capacity factor {capacity_factor})")
    try:
        # The einsums are linear in T at fixed C: time a slice of tokens, then scale. A small
        # slice runs the matmul less efficiently, so its estimate is high: the slice doubles
        # while the estimate is over budget and one probe stays cheap.
        calls = 1 + reps
        probe = min(PROBE_TOKENS, tokens)
        while True:
            probe_masks = one_hot_masks(
                expert_ids[:probe], weights[:probe], num_experts, capacity, x.dtype
            )[:2]
            probe_seconds = median_seconds(one_hot_einsum(x[:probe], *probe_masks), 1, warmup=0)
            estimate = probe_seconds * tokens / probe
            if estimate * calls <= budget or probe == tokens or probe_seconds > budget / 20:
                break
            probe = min(2 * probe, tokens)
        if estimate * calls > budget:
            flops = 4 * tokens * num_experts * capacity * width
            notes.append(
                f"skipped: estimated {estimate:.0f} s per dispatch+combine "
                f"({flops / estimate / 1e9:.1f} GFLOP/s from a {probe}-token probe), "
                f"x {calls} calls > --einsum-budget {budget:.0f} s"
            )
            return None, None, "; ".join(notes)
        mask_seconds = median_seconds(
            lambda: one_hot_masks(expert_ids, weights, num_experts, capacity, x.dtype), reps, 1
        )
        combine_weights, dispatch_mask, dropped = one_hot_masks(
            expert_ids, weights, num_experts, capacity, x.dtype
        )
        notes.append(f"{dropped} of {tokens * k} assignments dropped")
        seconds = median_seconds(one_hot_einsum(x, combine_weights, dispatch_mask), reps, 1)
    except (RuntimeError, MemoryError) as error:  # out of memory, or an unsupported kernel
        notes.append(f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
        return None, None, "; ".join(notes)
    return seconds, mask_seconds, "; ".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument(
        "--capacity-factor", type=float, default=1.25, help="GShard one-hot baseline's C"
    )
    parser.add_argument(
        "--einsum-budget",
        type=float,
        default=120.0,
        help="seconds the one-hot einsums may take per shape and dtype (else skipped)",
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'shape':8} {'dtype':9} {'op':9} {'ms':>8} {'GB/s':>7} {'bw_eff':>7} {'copy':>6}"
    print(header)
    baselines, notes = [], []
    for name in args.shapes:
        tokens, width, num_experts, k = SHAPES[name]
        logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(0))
        router = mr.TopK(num_experts=num_experts, k=k)
        routing = router(logits)
        plan_seconds = median_seconds(lambda routing=routing: mr.make_plan(routing), args.reps)
        plan = mr.make_plan(routing)
        rows = int(plan.num_valid)
        print(f"{name:8} {'int32':9} {'make_plan':9} {1e3 * plan_seconds:8.2f}")
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, width).to(dtype)
            ye = torch.randn(plan.num_rows, width).to(dtype)
            minimal = (tokens + rows) * width * x.element_size()
            roof = copy_gbps(args.reps)
            timings = {
                "dispatch": median_seconds(lambda x=x, plan=plan: mr.dispatch(x, plan), args.reps),
                "combine": median_seconds(lambda ye=ye, plan=plan: mr.combine(ye, plan), args.reps),
            }
            naive_dispatch, naive_combine = naive(
                x, ye, routing.token_ids, routing.weights, routing.expert_ids
            )
            naive_seconds = median_seconds(naive_dispatch, args.reps) + median_seconds(
                naive_combine, args.reps
            )
            loop_seconds = median_seconds(
                per_expert_loop(x, routing, num_experts, k), max(3, args.reps // 2)
            )
            for op, seconds in timings.items():
                gbps = minimal / seconds / 1e9
                print(
                    f"{name:8} {str(dtype)[6:]:9} {op:9} {1e3 * seconds:8.2f} {gbps:7.2f} "
                    f"{gbps / roof:7.2f} {roof:6.1f}"
                )
            einsum_seconds, mask_seconds, note = one_hot_baseline(
                x,
                routing,
                num_experts,
                k,
                args.capacity_factor,
                args.einsum_budget,
                max(3, args.reps // 2),
            )
            ours = timings["dispatch"] + timings["combine"]
            baselines.append(
                (name, str(dtype)[6:], ours, naive_seconds, loop_seconds, einsum_seconds, note)
            )
            if mask_seconds is not None:
                notes.append(f"{name} {str(dtype)[6:]}: one-hot masks {1e3 * mask_seconds:.1f} ms")
            notes.append(f"{name} {str(dtype)[6:]}: one-hot einsum {note}")
    print_baselines(baselines, notes)


def print_baselines(baselines, notes) -> None:
    """dispatch+combine time of each baseline, in ms and as a multiple of ours."""
    print()
    print("dispatch+combine, ms (and x ours); identity experts")
    print(
        f"{'shape':8} {'dtype':9} {'ours':>8} {'x[idx]+index_add_':>20} "
        f"{'per-expert loop':>20} {'one-hot einsum':>20}"
    )

    def cell(seconds, ours):
        if seconds is None:
            return f"{'skipped':>20}"
        return f"{1e3 * seconds:11.2f} {seconds / ours:7.2f}x"

    for name, dtype, ours, *others, _ in baselines:
        print(f"{name:8} {dtype:9} {1e3 * ours:8.2f} " + " ".join(cell(t, ours) for t in others))
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
