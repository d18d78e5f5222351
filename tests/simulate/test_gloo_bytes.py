"""The simulator's byte matrices equal what moerouter_torch.distributed sends on real Gloo ranks.

Each spawned rank routes its own tokens (recorded with moerouter.traces), runs
``distributed.dispatch`` and ``distributed.combine`` with ``torch.distributed.all_to_all_single``
wrapped to count the bytes it is asked to send to every rank, and writes the counts and its
trace. The test then simulates the concatenated trace and compares, cell by cell and exactly.
The ranks start from moerouter_torch's fork server (``_ranks.run_ranks``), never by forking this
process: JAX may be imported here already, and a fork of its threads can deadlock. Every run ends
within 60 s (small process-group and join timeouts), passing or failing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import moerouter as mr
from moerouter import simulate, traces, workloads

torch = pytest.importorskip("torch")
pytest.importorskip("moerouter_torch")

import torch.distributed as dist  # noqa: E402
from moerouter_torch._ranks import run_ranks  # noqa: E402

D = 6  # features per row: float32 rows of 24 bytes
E = 8  # experts: 4 per rank on 2 ranks, 2 per rank on 4


def tokens_on(rank):
    """Uneven batches (5, 8, 11, 14 tokens): uneven splits and uneven token_ranks."""
    return 5 + 3 * rank


def cases():
    """name -> (policy, static capacity or None). Each covers a way rows leave or stay home."""
    return {
        # Plain top-2: every choice is a real row.
        "topk": (mr.TopK(num_experts=E, k=2), None),
        # AdaMoE: rows of null experts never travel.
        "null": (mr.NullExperts(num_experts=E, num_null=E, k=3), None),
        # The policy's own capacity drops rows before the exchange.
        "policy_capacity": (mr.TopK(num_experts=E, k=2, capacity_factor=0.5), None),
        # Static capacity: C rows per expert from every rank, padded, the overflow dropped.
        "static_capacity": (mr.TopK(num_experts=E, k=2), 2),
    }


def logits_for(name, rank):
    columns = E + (E if name == "null" else 0)
    # Zipf-skewed so that some (rank, expert) pairs exceed the static capacity and some are 0.
    return workloads.zipf(
        tokens_on(rank), columns, exponent=1.5, seed=(7, rank), like=torch.ones(1)
    )


def worker(rank, world, folder):
    from moerouter_torch import distributed

    sent = []  # (phase, dtype, bytes to each rank)
    phase = ["none"]
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        rows = input.shape[0]
        row_bytes = input.element_size() * (input.numel() // rows if rows else 0)
        splits = [rows // world] * world if input_split_sizes is None else input_split_sizes
        sent.append((phase[0], str(input.dtype), [int(s) * row_bytes for s in splits]))
        return original(output, input, output_split_sizes, input_split_sizes, **kwargs)

    original_gather = dist.all_gather

    def counting_gather(outputs, input, **kwargs):
        # An all-gather sends this rank's tensor to every rank (itself included).
        sent.append((phase[0], "header", [input.numel() * input.element_size()] * world))
        return original_gather(outputs, input, **kwargs)

    dist.all_to_all_single = counting
    dist.all_gather = counting_gather
    try:
        counted = {}
        with traces.record() as recorder:
            for layer, (name, (policy, capacity)) in enumerate(cases().items()):
                sent.clear()
                router = traces.traced(policy, layer=layer, name=name)
                x = torch.randn(tokens_on(rank), D, generator=torch.Generator().manual_seed(rank))
                with torch.no_grad():
                    plan = mr.make_plan(router(logits_for(name, rank)))
                    phase[0] = "dispatch"
                    exchange = distributed.dispatch(x, plan, capacity=capacity)
                    phase[0] = "combine"
                    distributed.combine(exchange.rows, exchange)
                # Rows this rank's experts receive, per local expert (after a static capacity).
                counted[name] = {"sent": list(sent), "received": exchange.group_sizes.tolist()}
        recorder.save(os.path.join(folder, f"rank{rank}.npz"))
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
            json.dump(counted, handle)
    finally:
        dist.all_to_all_single = original
        dist.all_gather = original_gather


def matrix(counted, world, name, phase, kinds):
    """(W, W) bytes: row s = what rank s asked the collectives to send each rank, summed over
    the calls of ``phase`` whose kind ("torch.float32" rows, "torch.int64" counts, "header")
    is in ``kinds``."""
    out = np.zeros((world, world), dtype=np.int64)
    for rank in range(world):
        for call_phase, kind, per_rank in counted[rank][name]["sent"]:
            if call_phase == phase and kind in kinds:
                out[rank] += per_rank
    return out


@pytest.mark.slow  # spawns ranks that each import torch
@pytest.mark.parametrize(
    "world",
    [
        2,  # two ranks on one node: intra-node traffic only
        4,  # four ranks, two per node: intra- and inter-node traffic, uneven batches
    ],
)
def test_simulated_bytes_equal_counted_gloo_bytes(world, tmp_path):
    run_ranks(worker, world, str(tmp_path), timeout=30.0)
    counted = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    recorded = [traces.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    token_ranks = np.repeat(np.arange(world), [tokens_on(r) for r in range(world)])
    topology = simulate.Topology(world_size=world, ranks_per_node=2)
    for layer, (name, (_, capacity)) in enumerate(cases().items()):
        step = traces.concatenate(trace.records[layer] for trace in recorded)
        assert step.name == name
        result = simulate.run(
            step,
            topology=topology,
            hidden_size=D,
            bytes_per_element=4,
            capacity=capacity,
            token_ranks=token_ranks,
        )
        rows, control = {"torch.float32"}, {"torch.int64", "header"}
        dispatch = matrix(counted, world, name, "dispatch", rows)
        np.testing.assert_array_equal(result.dispatch_bytes, dispatch, err_msg=name)
        np.testing.assert_array_equal(
            result.combine_bytes, matrix(counted, world, name, "combine", rows), err_msg=name
        )
        np.testing.assert_array_equal(
            result.count_bytes, matrix(counted, world, name, "dispatch", control), err_msg=name
        )
        assert matrix(counted, world, name, "dispatch", {"header"}).any()  # the header was seen
        assert not matrix(counted, world, name, "combine", control).any()  # nothing goes back
        # The loads: rows each expert (ranks in order, local experts in order) really received.
        received = np.concatenate([counted[rank][name]["received"] for rank in range(world)])
        np.testing.assert_array_equal(result.expert_load[0], received, err_msg=name)
        np.testing.assert_array_equal(
            result.rank_load[0], received.reshape(world, -1).sum(axis=1), err_msg=name
        )
        # Non-trivial cases: rows cross ranks, and each mechanism did something.
        assert dispatch.sum() > np.trace(dispatch)
        if name == "null":
            assert 0 < result.null_choices[0] < result.choices[0]
        if name == "policy_capacity":
            assert result.policy_dropped[0] > 0
        if name == "static_capacity":
            assert result.capacity_dropped[0] > 0
            assert result.rows_sent[0] == world * E * capacity


def test_header_bytes_match_the_torch_layer():
    from moerouter_torch import distributed

    assert simulate.HEADER_BYTES == distributed._HEADER_SIZE * 8
