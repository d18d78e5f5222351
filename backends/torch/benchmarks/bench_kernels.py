"""CPU benchmark of the torch kernels against the same-run copy roof and naive baselines.

    python backends/torch/benchmarks/bench_kernels.py [--reps 7] [--shapes olmoe mixtral]

For each shape and dtype: median times of make_plan, dispatch, combine; achieved GB/s on the
minimal bytes ``(T + R) * d * itemsize`` per direction (each input row read once, each output
row written once, R = real rows); ``bw_efficiency`` = GB/s / copy GB/s measured in the same run;
and the ratio of dispatch+combine time against (a) naive ``x[idx]`` + ``index_add_`` and (b) a
per-expert loop as in transformers' ``MixtralSparseMoeBlock`` (identity experts: data movement
only). Timings are benchmarks, never assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moerouter as mr

SHAPES = {
    "olmoe": (4096, 2048, 64, 8),
    "mixtral": (4096, 4096, 8, 2),
}


def median_seconds(fn, reps: int) -> float:
    # The first few calls of a process pay one-off costs (thread pools, allocator growth).
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_gbps(reps: int) -> float:
    source = torch.empty(1 << 29, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source).fill_(0)
    seconds = median_seconds(lambda: target.copy_(source), reps)
    return 2 * source.numel() / seconds / 1e9


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'shape':8} {'dtype':9} {'op':9} {'ms':>8} {'GB/s':>7} {'bw_eff':>7} {'copy':>6}"
    print(header)
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
            ours = timings["dispatch"] + timings["combine"]
            print(
                f"{name:8} {str(dtype)[6:]:9} ratios: naive x[idx]+index_add_ "
                f"{1e3 * naive_seconds:.2f} ms = {naive_seconds / ours:.2f}x ours; "
                f"per-expert loop {1e3 * loop_seconds:.2f} ms = {loop_seconds / ours:.2f}x ours"
            )


if __name__ == "__main__":
    main()
