"""The expert-parallel simulator at cluster scale: W ranks, 64 layers, 2**20 tokens per step.

The simulator's input is each layer's routing decision: expert ids (T, k). Building 64 layers
of 2**20 x 8 Zipf-popular ids here would take longer than simulating them, so four distinct
layers are drawn (with replacement from a Zipf(1.2) popularity, by inverse CDF) and each is
used for 16 of the 64 layers: the simulator keeps nothing between calls, so every call does
its full work. The records carry choice ids and finite rows as a recorded trace does.

Run the full-size timing once with ``python asv_bench/benchmarks/bench_simulate.py``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from moerouter import simulate, traces

LAYERS, TOKENS, K = 64, 1 << 20, 8
DISTINCT_LAYERS = 4


def layers(world: int, experts: int, tokens: int = TOKENS, seed: int = 0) -> list[object]:
    """``LAYERS`` trace records of Zipf(1.2)-popular expert ids, ``DISTINCT_LAYERS`` distinct."""
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, experts + 1, dtype=np.float64) ** -1.2
    cumulative = np.cumsum(popularity[rng.permutation(experts)])
    cumulative /= cumulative[-1]
    distinct = []
    for layer in range(DISTINCT_LAYERS):
        ids = np.searchsorted(cumulative, rng.random(tokens * K), side="right")
        ids = np.minimum(ids, experts - 1).astype(np.int32)
        distinct.append(
            traces.TraceRecord(
                layer=layer,
                step=0,
                name="",
                token_ids=np.repeat(np.arange(tokens, dtype=np.int32), K),
                expert_ids=ids,
                weights=np.full(ids.shape, 1.0 / K, dtype=np.float32),
                choice_ids=ids,
                finite_rows=np.ones(tokens, dtype=bool),
                sequence=np.zeros(tokens, dtype=np.int32),
                position=np.arange(tokens, dtype=np.int32),
                num_tokens=tokens,
                num_experts=experts,
                num_choices=experts,
                layout="token",
                slots=K,
            )
        )
    return [distinct[layer % DISTINCT_LAYERS] for layer in range(LAYERS)]


class Simulate:
    """One 64-layer step of 2**20 tokens, k = 8, on W ranks with E = W experts."""

    params = ([64, 1024], ["contiguous", "round_robin"], [None, 1.25])
    param_names = ("world", "placement", "capacity_factor")
    number = 1
    repeat = (1, 3, 60.0)
    timeout = 600.0

    def setup(self, world: int, placement: str, capacity_factor: float | None) -> None:
        self.layers = layers(world, world)
        self.topology = simulate.Topology(world_size=world)

    def time_step(self, world: int, placement: str, capacity_factor: float | None) -> None:
        simulate.run(
            self.layers,
            topology=self.topology,
            placement=placement,
            capacity_factor=capacity_factor,
        )


def main() -> None:
    """Time the full-size cases once each and print a table."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{LAYERS} layers x {TOKENS} tokens x k={K} per step, one run each; wall time depends on "
        f"the machine's load (1-minute load average {load:.1f} on {os.cpu_count()} cores), "
        "CPU time much less"
    )
    for world, experts in ((1024, 1024), (1024, 4096)):
        started = time.perf_counter()
        records = layers(world, experts)
        built = time.perf_counter() - started
        topology = simulate.Topology(world_size=world)
        for placement, capacity_factor in (
            ("contiguous", None),
            ("round_robin", None),
            ("contiguous", 1.25),
        ):
            started, cpu = time.perf_counter(), time.process_time()
            result = simulate.run(
                records, topology=topology, placement=placement, capacity_factor=capacity_factor
            )
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            print(
                f"W={world:5d} E={experts:5d} {placement:<11} cf={capacity_factor!s:<5} "
                f"simulate {seconds:6.2f} s wall, {cpu:6.2f} s CPU  (input built in {built:.1f} s; "
                f"rank max/mean {result.totals()['rank_max_over_mean']:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
