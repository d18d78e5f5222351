"""Bytes an expert-parallel all-to-all sends, against the minimum, and what null experts save.

    torchrun --standalone --nproc-per-node 2 backends/torch/benchmarks/bench_distributed.py
    torchrun ... bench_distributed.py --tokens 2048 --hidden 512 --experts 8 --reps 5

Each rank routes ``--tokens`` random tokens with a random gate (the same weights on every
rank) and sends them with :func:`moerouter_torch.distributed.dispatch`. For every router the
table gives, summed over ranks, per layer forward (the backward sends as much again):

* ``rows``: rows sent by the dropless transport, against ``T * k`` slots;
* ``MB sent``: row bytes plus the count exchange (``E`` int64 per rank) and the header every
  dispatch gathers first (settings and failure flag, 344 bytes from each rank to each rank);
* ``MB minimum``: real rows x d x itemsize, the least any transport can send;
* ``MB off-rank``: the part of the rows that leaves its rank (the rest is a local copy);
* ``MB capacity``: what the static-capacity transport sends, ``E * C * d * itemsize`` per rank,
  with ``C = ceil(capacity_factor * T * k / E)``;
* ``ms``, ``ms cap``: median wall time (slowest rank) of dispatch + combine through identity
  experts, dropless and static capacity (data movement and both all-to-alls; Gloo on loopback,
  so a CPU memory-copy figure, not a network one);
* ``ms header``: median time of the header exchange alone, the part of ``ms`` that checks the
  settings and carries the failure flag (one small all-gather and a host read).

The saving from null experts is the ratio of AdaMoE's real rows to the rows top-k with the same
``k`` sends: every null-expert choice stays home. Timings are benchmarks, never assertions.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.distributed as dist
from moerouter_torch import distributed
from moerouter_torch.distributed import _DISPATCH, _HEADER_SIZE, _agree, _exchange_settings

import moerouter as mr


def measure(router, x, gate, reps, capacity_factor):
    """Summed over ranks: real rows, row slots, bytes sent; capacity bytes; median ms."""
    num_experts = router.num_experts
    plan = mr.make_plan(router(x @ gate))
    exchange = distributed.dispatch(x, plan)
    itemsize = x.element_size()
    width = x.shape[1]
    slots = plan.num_rows
    capacity = math.ceil(capacity_factor * slots / num_experts)
    counts_bytes = num_experts * 8 + _HEADER_SIZE * 8 * dist.get_world_size()
    off_rank = sum(exchange.send_splits) - exchange.send_splits[dist.get_rank()]
    totals = torch.tensor(
        [
            int(exchange.rows_sent),
            slots,
            int(exchange.rows_sent) * width * itemsize + counts_bytes,
            off_rank * width * itemsize,
            num_experts * capacity * width * itemsize,
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(totals)
    medians = []
    for mode in (None, capacity):
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            exchange = distributed.dispatch(x, plan, capacity=mode)
            distributed.combine(exchange.rows, exchange)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    settings = _exchange_settings(plan, x, None)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        _agree(None, x.device, _DISPATCH, settings, None)
        times.append(time.perf_counter() - start)
    medians.append(statistics.median(times))
    slowest = torch.tensor(medians)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return totals.tolist(), (1e3 * slowest).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512, help="d")
    parser.add_argument("--experts", type=int, default=8, help="real experts E")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = args.experts
    routers = {
        "top-2": mr.TopK(num_experts=num_experts, k=2),
        "top-4": mr.TopK(num_experts=num_experts, k=4),
        f"AdaMoE k=4 +{num_experts} null": mr.NullExperts(
            num_experts=num_experts, num_null=num_experts, k=4
        ),
    }
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    if rank == 0:
        print(
            f"world={world} T={args.tokens}/rank d={args.hidden} E={num_experts} float32, "
            f"capacity factor {args.capacity_factor}; sums over ranks, one forward"
        )
        header = ("router", "rows", "slots", "MB sent", "MB minimum", "MB off-rank")
        header += ("MB capacity", "ms", "ms cap", "ms header")
        print("{:<20} {:>6} {:>6} {:>8} {:>10} {:>11} {:>11} {:>7} {:>7} {:>9}".format(*header))
    real_rows = {}
    for name, router in routers.items():
        columns = num_experts + getattr(router, "num_null", 0)
        gate = torch.randn(args.hidden, columns, generator=torch.Generator().manual_seed(99))
        gate /= args.hidden**0.5
        (rows, slots, sent, off_rank, capacity_bytes), (ms, ms_capacity, ms_header) = measure(
            router, x, gate, args.reps, args.capacity_factor
        )
        real_rows[name] = rows
        minimum = rows * args.hidden * x.element_size()
        if rank == 0:
            print(
                f"{name:<20} {rows:>6.0f} {slots:>6.0f} {sent / 1e6:>8.3f} {minimum / 1e6:>10.3f} "
                f"{off_rank / 1e6:>11.3f} {capacity_bytes / 1e6:>11.3f} {ms:>7.2f} "
                f"{ms_capacity:>7.2f} {ms_header:>9.3f}"
            )
    if rank == 0:
        adamoe = real_rows[f"AdaMoE k=4 +{num_experts} null"]
        print(
            f"null experts: AdaMoE sends {adamoe / real_rows['top-4']:.1%} of top-4's rows "
            f"({1 - adamoe / real_rows['top-4']:.1%} saved), "
            f"{adamoe / real_rows['top-2']:.1%} of top-2's"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
