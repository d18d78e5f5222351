"""The simulator against a slow, obvious twin, its invariants, its load figures and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import moerouter as mr
from moerouter import simulate, traces, workloads
from moerouter.testing import to_numpy


def reference(expert_ids, token_of_row, token_ranks, placement, world, capacity=None):
    """Loop over every row: rows from each rank to each rank, and per (rank, expert) counts."""
    num_experts = len(placement)
    per_pair = np.zeros((world, num_experts), dtype=np.int64)
    for expert, token in zip(expert_ids.tolist(), token_of_row.tolist(), strict=True):
        if expert >= 0:
            per_pair[token_ranks[token], expert] += 1
    kept = per_pair if capacity is None else np.minimum(per_pair, capacity)
    real = np.zeros((world, world), dtype=np.int64)
    sent = np.zeros((world, world), dtype=np.int64)
    for source in range(world):
        for expert in range(num_experts):
            real[source, placement[expert]] += kept[source, expert]
            sent[source, placement[expert]] += (
                kept[source, expert] if capacity is None else capacity
            )
    return per_pair, kept, real, sent


def brute_time(matrix, topology):
    """The cost model of the package docstring, rank by rank."""
    node = [r // topology.ranks_per_node for r in range(topology.world_size)]
    worst, any_inter, any_intra = 0.0, False, False
    for rank in range(topology.world_size):
        links = {"out_intra": 0, "in_intra": 0, "out_inter": 0, "in_inter": 0}
        for other in range(topology.world_size):
            if other == rank:
                continue
            kind = "intra" if node[other] == node[rank] else "inter"
            links[f"out_{kind}"] += matrix[rank, other]
            links[f"in_{kind}"] += matrix[other, rank]
        any_inter |= links["out_inter"] > 0
        any_intra |= links["out_intra"] > 0
        worst = max(
            worst,
            links["out_intra"] / topology.intra_node_bandwidth,
            links["in_intra"] / topology.intra_node_bandwidth,
            links["out_inter"] / topology.inter_node_bandwidth,
            links["in_inter"] / topology.inter_node_bandwidth,
        )
    latency = topology.inter_node_latency if any_inter else 0.0
    if not any_inter and any_intra:
        latency = topology.intra_node_latency
    return worst + latency


TOPOLOGY = simulate.Topology(world_size=6, ranks_per_node=4)  # a partial second node


@pytest.mark.parametrize(
    ("placement", "capacity", "tokens", "uneven"),
    [
        ("contiguous", None, 36, False),  # the distributed layout, equal blocks (fast path)
        ("round_robin", None, 37, False),  # tokens not a multiple of the world: general path
        ("node_grouped", 2, 36, False),  # LocMoE grouping with a static capacity
        ([5, 0, 0, 3, 3, 3, 1, 2, 4, 4, 5, 0], None, 30, True),  # a table, uneven token ranks
        ([5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5], 1, 30, True),  # every expert on one rank
    ],
)
def test_matches_the_row_by_row_twin(placement, capacity, tokens, uneven):
    experts, k, world = 12, 3, TOPOLOGY.world_size
    routing = mr.TopK(num_experts=experts, k=k)(workloads.zipf(tokens, experts, seed=tokens))
    rng = np.random.default_rng(0)
    token_ranks = (
        np.sort(rng.integers(0, world, tokens)) if uneven else np.arange(tokens) * world // tokens
    )
    where = simulate.place_experts(placement, experts, TOPOLOGY)
    result = simulate.run(
        routing,
        topology=TOPOLOGY,
        placement=placement,
        hidden_size=3,
        bytes_per_element=4,
        capacity=capacity,
        token_ranks=token_ranks if uneven else None,
        keep_matrices=True,
    )
    ids = to_numpy(routing.expert_ids)
    per_pair, kept, real, sent = reference(
        ids, to_numpy(routing.token_ids), token_ranks, where, world, capacity
    )
    np.testing.assert_array_equal(result.dispatch_bytes, sent * 12)
    np.testing.assert_array_equal(result.combine_bytes, sent.T * 12)
    np.testing.assert_array_equal(result.layer_dispatch_bytes[0], sent * 12)
    np.testing.assert_array_equal(result.tokens_per_expert[0], per_pair.sum(axis=0))
    np.testing.assert_array_equal(result.expert_load[0], kept.sum(axis=0))
    np.testing.assert_array_equal(result.rank_load[0], real.sum(axis=0))
    assert result.capacity_dropped[0] == per_pair.sum() - kept.sum()
    assert result.rows_sent[0] == sent.sum()
    node = np.arange(world) // TOPOLOGY.ranks_per_node
    same_node = node[:, None] == node[None, :]
    assert result.local_rows[0] == np.trace(real)
    assert result.intra_node_rows[0] == real[same_node].sum() - np.trace(real)
    assert result.inter_node_rows[0] == real[~same_node].sum()
    assert result.dispatch_time[0] == pytest.approx(brute_time(sent * 12, TOPOLOGY), rel=1e-12)
    assert result.combine_time[0] == pytest.approx(brute_time(sent.T * 12, TOPOLOGY), rel=1e-12)
    experts_on = np.bincount(where, minlength=world)
    np.testing.assert_array_equal(
        result.count_bytes, np.broadcast_to(simulate.HEADER_BYTES + 8 * experts_on, (world, world))
    )


def test_cost_model_by_hand():
    # Two nodes of two ranks. Rank 0 sends 100 bytes to rank 1 (intra) and 50 to rank 2 (inter).
    topology = simulate.Topology(
        world_size=4,
        ranks_per_node=2,
        intra_node_bandwidth=100.0,
        inter_node_bandwidth=10.0,
        intra_node_latency=0.5,
        inter_node_latency=2.0,
    )
    expert_ids = np.array([[1]] * 100 + [[2]] * 50 + [[-1]] * 150)  # 300 tokens, 75 per rank:
    token_ranks = np.array([0] * 150 + [3] * 150)  # rank 0 routes 150, rank 3 none that count
    result = simulate.run(
        [expert_ids],
        num_experts=4,
        topology=topology,
        hidden_size=1,
        bytes_per_element=1,
        token_ranks=token_ranks,
    )
    # max(100 / 100, 50 / 10) + inter-node latency = 5 + 2.
    assert result.dispatch_time[0] == pytest.approx(7.0)
    assert result.combine_time[0] == pytest.approx(7.0)
    # Control: every rank sends each other rank its header and 8 bytes of counts; the inter-node
    # ones dominate.
    control = simulate.HEADER_BYTES + 8
    assert result.count_time[0] == pytest.approx(max(control / 100, 2 * control / 10) + 2.0)


def test_layers_steps_and_totals():
    experts, world = 8, 4
    topology = simulate.Topology(world_size=world, ranks_per_node=2)
    router = traces.traced(mr.TopK(num_experts=experts, k=2), layer=0)
    with traces.record() as recorder:
        for step in range(3):
            for layer in range(2):
                traces.traced(router.policy, layer=layer)(
                    workloads.zipf(40, experts, seed=(step, layer))
                )
    result = simulate.run(recorder.trace, topology=topology, hidden_size=2, bytes_per_element=2)
    assert result.num_calls == 6
    assert result.layer.tolist() == [0, 1] * 3 and result.step.tolist() == [0, 0, 1, 1, 2, 2]
    totals = result.totals()
    assert totals["real_experts_per_token"] == 2.0
    per_call = result.count_time + result.dispatch_time + result.combine_time
    assert totals["step_time"] == pytest.approx(per_call.sum() / 3)
    assert totals["local_share"] + totals["intra_node_share"] + totals["inter_node_share"] == (
        pytest.approx(1.0)
    )
    # Every real row is sent once and received once.
    assert result.dispatch_bytes.sum() == result.real_rows.sum() * 4
    np.testing.assert_array_equal(result.rank_load.sum(axis=1), result.real_rows)
    assert result.count_bytes.sum() == 6 * world * (world * simulate.HEADER_BYTES + experts * 8)
    document = result.to_dict()
    assert document["totals"] == totals and len(document["rank_load"]) == 6


def routings():
    """name -> routing whose load figures the simulator must report as stats.summary does."""
    logits = workloads.zipf(48, 16, exponent=1.0, seed=3)
    logits[7] = np.nan  # a non-finite row: its choices count nowhere
    logits[9, :8] = -np.inf  # some -inf logits
    return {
        "topk": mr.TopK(num_experts=8, k=2)(logits[:, :8]),
        "null": mr.NullExperts(num_experts=8, num_null=8, k=4)(logits),
        "policy_capacity": mr.TopK(num_experts=8, k=2, capacity_factor=0.6)(
            logits[:, :8].reshape(4, 12, 8)
        ),
        "expert_choice": mr.ExpertChoice(num_experts=8, capacity_factor=1.0)(logits[:, :8]),
        "deepseek": mr.DeepSeekTopK(num_experts=16, k=3, num_groups=4, topk_groups=2)(logits),
    }


@pytest.mark.parametrize("name", list(routings()))
def test_load_figures_equal_stats_summary(name, backend):
    numpy_routing = routings()[name]
    # The same decision on the backend, through a trace record: any backend's routing works.
    routing = traces.TraceRecord.from_routing(numpy_routing, probs=True).routing(
        xp=backend.namespace()
    )
    result = simulate.run(routing, topology=simulate.Topology(world_size=4, ranks_per_node=2))
    mine, theirs = result.summary(0), mr.stats.summary(routing)
    np.testing.assert_array_equal(mine["tokens_per_expert"], to_numpy(theirs["tokens_per_expert"]))
    for key in ("load_cv", "load_max_over_mean", "dropped_fraction", "real_experts_per_token"):
        assert mine[key] == pytest.approx(float(to_numpy(theirs[key])), rel=1e-6, abs=1e-7), key
    assert mine["null_fraction"] == pytest.approx(
        float(to_numpy(theirs["null_fraction"])), rel=1e-6
    )
    if name == "null":
        assert result.totals()["null_saved"] == pytest.approx(mine["null_fraction"])


def test_equal_blocks_fast_path_equals_the_general_path():
    routing = mr.TopK(num_experts=16, k=4)(workloads.zipf(64, 16, seed=1))
    topology = simulate.Topology(world_size=8, ranks_per_node=4)
    fast = simulate.run(routing, topology=topology)
    general = simulate.run(routing, topology=topology, token_ranks=np.arange(64) // 8)
    for key in ("dispatch_bytes", "rank_load", "expert_load", "inter_node_rows", "dispatch_time"):
        np.testing.assert_array_equal(getattr(fast, key), getattr(general, key), err_msg=key)


def test_locality_routing_keeps_rows_on_the_node():
    world, per_node, experts = 8, 4, 16
    topology = simulate.Topology(world_size=world, ranks_per_node=per_node)
    logits = workloads.zipf(world * 10, experts, seed=2)
    token_nodes = np.repeat(topology.node_of_rank(), 10)
    local = mr.LocalityTopK(num_experts=experts, k=2, num_nodes=2, max_nodes=1)(logits, token_nodes)
    result = simulate.run(local, topology=topology, placement="node_grouped")
    assert result.inter_node_rows[0] == 0 and result.totals()["locality_saved"] == 1.0
    free = simulate.run(mr.TopK(num_experts=experts, k=2)(logits), topology=topology)
    assert free.inter_node_rows[0] > 0
    # A round-robin placement breaks the node blocks LocalityTopK assumes.
    scattered = simulate.run(local, topology=topology, placement="round_robin")
    assert scattered.inter_node_rows[0] > 0


def test_capacity_factor_gives_the_documented_capacity():
    routing = mr.TopK(num_experts=8, k=2)(workloads.zipf(40, 8, exponent=1.5, seed=0))
    topology = simulate.Topology(world_size=4)
    result = simulate.run(routing, topology=topology, capacity_factor=1.25)
    assert result.capacity == math.ceil(1.25 * 10 * 2 / 8)
    assert result.rows_sent[0] == 4 * 8 * result.capacity
    assert result.capacity_dropped[0] > 0
    same = simulate.run(routing, topology=topology, capacity=result.capacity)
    np.testing.assert_array_equal(same.dispatch_bytes, result.dispatch_bytes)
    # The largest rank's tokens set it (here rank 0 holds 16 of the 40).
    uneven = np.repeat(np.arange(4), [16, 8, 8, 8])
    skewed = simulate.run(routing, topology=topology, capacity_factor=1.25, token_ranks=uneven)
    assert skewed.capacity == math.ceil(1.25 * 16 * 2 / 8)
    # Expert layout: the assignments per token are E * C / S on average.
    chosen = mr.ExpertChoice(num_experts=8, capacity_factor=2.0)(workloads.uniform(40, 8))
    per_token = chosen.expert_ids.shape[0] / 40  # C = 10 per expert: 2 assignments per token
    result = simulate.run(chosen, topology=topology, capacity_factor=1.25)
    assert result.capacity == math.ceil(1.25 * 10 * per_token / 8)


def test_zero_tokens_still_exchange_counts():
    topology = simulate.Topology(world_size=2, ranks_per_node=1)
    result = simulate.run([np.zeros((0, 2), dtype=np.int32)], num_experts=4, topology=topology)
    assert not result.dispatch_bytes.any() and result.rank_load.sum() == 0
    control = simulate.HEADER_BYTES + 16
    assert result.count_bytes.tolist() == [[control] * 2] * 2  # every rank still takes part
    assert result.dispatch_time[0] == 0.0 and result.count_time[0] > 0
    assert result.totals()["real_experts_per_token"] == 0.0


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("contiguous", "multiple of world_size"),  # 12 experts on 8 ranks
        ("node_grouped", "multiple of the 3 nodes"),  # 12 experts on 3 nodes is fine: see below
        ("diagonal", "placement must be one of"),
        (np.arange(11), "shape"),
        (np.full(12, 8), r"\[0, world_size"),
    ],
)
def test_bad_placements(kind, message):
    topology = simulate.Topology(world_size=8, ranks_per_node=3)
    if isinstance(kind, str) and kind == "node_grouped":
        simulate.place_experts(kind, 12, topology)  # 3 nodes of 3, 3 and 2 ranks: 4 each
        kind, experts = "node_grouped", 10
    else:
        experts = 12
    with pytest.raises(ValueError, match=message):
        simulate.place_experts(kind, experts, topology)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: simulate.Topology(world_size=0), ValueError, "world_size"),
        (lambda: simulate.Topology(world_size=2, ranks_per_node=1.5), TypeError, "ranks_per_node"),
        (
            lambda: simulate.Topology(world_size=2, inter_node_bandwidth=0),
            ValueError,
            "inter_node_bandwidth",
        ),
        (lambda: simulate.Topology(world_size=2, intra_node_latency=-1), ValueError, "latency"),
        (lambda: simulate.run([], topology=simulate.Topology(world_size=2)), ValueError, "empty"),
        (lambda: simulate.run(np.zeros((2, 1), int), topology=None), TypeError, "topology"),
        (
            lambda: simulate.run(np.zeros((2, 1), int), topology=simulate.Topology(world_size=2)),
            ValueError,
            "num_experts",
        ),
        (
            lambda: simulate.run(
                [np.full((2, 1), 4)], num_experts=4, topology=simulate.Topology(world_size=2)
            ),
            ValueError,
            "expert ids",
        ),
        (
            lambda: simulate.run(
                [np.zeros((2, 1), int)],
                num_experts=2,
                topology=simulate.Topology(world_size=2),
                capacity=1,
                capacity_factor=1.0,
            ),
            ValueError,
            "not both",
        ),
        (
            lambda: simulate.run(
                [np.zeros((2, 1), int)],
                num_experts=2,
                topology=simulate.Topology(world_size=2),
                token_ranks=np.array([0, 2]),
            ),
            ValueError,
            "token_ranks",
        ),
        (
            lambda: simulate.run(
                [np.zeros((2, 1), int), np.zeros((2, 1), int)],
                num_experts=2,
                topology=simulate.Topology(world_size=2),
                token_ranks=np.array([0]),
            ),
            ValueError,
            "token_ranks",
        ),
        (
            lambda: simulate.run(
                [np.zeros((2, 1), int)],
                num_experts=2,
                topology=simulate.Topology(world_size=2),
                hidden_size=0,
            ),
            ValueError,
            "hidden_size",
        ),
        (
            lambda: simulate.run(["topk"], topology=simulate.Topology(world_size=2)),
            TypeError,
            "each layer",
        ),
    ],
)
def test_bad_input_names_the_parameter(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_layers_with_different_expert_counts_are_rejected():
    topology = simulate.Topology(world_size=2)
    first = mr.TopK(num_experts=4, k=1)(workloads.uniform(4, 4))
    second = mr.TopK(num_experts=8, k=1)(workloads.uniform(4, 8))
    with pytest.raises(ValueError, match="same number of experts"):
        simulate.run([first, second], topology=topology)
