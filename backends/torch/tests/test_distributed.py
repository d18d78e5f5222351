"""Expert parallelism on Gloo: every rank's outputs and gradients equal the single-process MoE.

Starting processes dominates the cost, so each start runs every check in one worker. The
launcher bounds every run (``moerouter_torch._ranks``): a hang fails the test. The fault cases
(empty ranks, mismatched settings, failing ranks) are in
tests/reliability/test_distributed_faults.py.
"""

import pytest
import torch
import torch.distributed as dist
from moerouter_torch import MoE, distributed
from moerouter_torch._ranks import run_ranks
from moerouter_torch.distributed import ExpertParallelMoE, experts_per_rank

import moerouter as mr

TOKENS, D, H, E = 5, 8, 12, 8  # tokens per rank; 8 experts divide over 2 and 4 ranks


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference(moe, x_all, upstream):
    """The single-process MoE over every rank's tokens: output, and gradients of <y, upstream>."""
    moe.zero_grad()
    x = x_all.clone().requires_grad_()
    y, _ = moe(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad


def check_matches_single_process(router, rank, world, capacity=None):
    torch.manual_seed(0)
    moe = MoE(D, H, router, activation="gelu")
    x_all, upstream = randn(world * TOKENS, D, seed=1), randn(world * TOKENS, D, seed=2)
    y_ref, grad_x_ref = reference(moe, x_all, upstream)
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)

    layer = ExpertParallelMoE.from_moe(moe, capacity=capacity)
    x = x_all[mine].clone().requires_grad_()
    y, _ = layer(x)
    (y * upstream[mine]).sum().backward()
    torch.testing.assert_close(y, y_ref[mine])
    torch.testing.assert_close(x.grad, grad_x_ref[mine])
    block = slice(layer.first_expert, layer.first_expert + E // world)
    torch.testing.assert_close(layer.experts.w_in.grad, moe.experts.w_in.grad[block])
    torch.testing.assert_close(layer.experts.w_out.grad, moe.experts.w_out.grad[block])
    # The gate is replicated: each rank holds the gradient of its own tokens.
    dist.all_reduce(layer.gate.weight.grad)
    torch.testing.assert_close(layer.gate.weight.grad, moe.gate.weight.grad)

    # Exactly the real assignments travel: no null-expert rows, no padding.
    with torch.no_grad():
        routing = router(layer.gate(x))
        exchange = distributed.dispatch(x, mr.make_plan(routing), capacity=capacity)
    real = int((routing.expert_ids >= 0).sum())
    sent = int(exchange.rows_sent)
    assert sent == (E * capacity if capacity else real)
    assert int(exchange.group_sizes.sum()) <= exchange.rows.shape[0]
    totals = torch.tensor([real, sent, int(exchange.group_sizes.sum())])
    dist.all_reduce(totals)
    assert totals[2] == totals[0]  # every real row arrives once, counted in group_sizes
    if capacity is None:
        assert totals[1] == totals[0]  # and nothing else is sent
    return int(totals[0])


def check_all_rows_to_one_expert(rank, world):
    """Every token picks expert 0: ranks other than 0 receive nothing, experts 1.. get nothing."""
    torch.manual_seed(0)
    moe = MoE(D, H, mr.TopK(num_experts=E, k=1))
    x_all = randn(world * TOKENS, D, seed=3)
    logits_all = torch.zeros(world * TOKENS, E)
    logits_all[:, 0] = 5.0
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)

    x_ref = x_all.clone().requires_grad_()
    plan_ref = mr.make_plan(moe.router(logits_all))
    y_ref = mr.combine(moe.experts(mr.dispatch(x_ref, plan_ref), plan_ref.group_sizes), plan_ref)
    y_ref.sum().backward()

    layer = ExpertParallelMoE.from_moe(moe)
    x = x_all[mine].clone().requires_grad_()
    exchange = distributed.dispatch(x, mr.make_plan(moe.router(logits_all[mine])))
    assert exchange.rows.shape[0] == (world * TOKENS if rank == 0 else 0)
    want_sizes = [world * TOKENS if rank == 0 else 0] + [0] * (E // world - 1)
    assert exchange.group_sizes.tolist() == want_sizes
    y = distributed.combine(layer.experts(exchange.rows, exchange.group_sizes), exchange)
    y.sum().backward()
    torch.testing.assert_close(y, y_ref[mine].detach())
    torch.testing.assert_close(x.grad, x_ref.grad[mine])
    block = slice(layer.first_expert, layer.first_expert + E // world)
    torch.testing.assert_close(layer.experts.w_in.grad, moe.experts.w_in.grad[block])


def check_capacity_drops(rank, world, capacity):
    """Rows past the capacity come back as zero, exactly like dropped tokens."""
    torch.manual_seed(0)
    moe = MoE(D, H, mr.TopK(num_experts=E, k=2))
    x = randn(world * TOKENS, D, seed=4)[rank * TOKENS : (rank + 1) * TOKENS]
    layer = ExpertParallelMoE.from_moe(moe, capacity=capacity)
    with torch.no_grad():
        plan = mr.make_plan(moe.router(moe.gate(x)))
        exchange = distributed.dispatch(x, plan, capacity=capacity)
        y = distributed.combine(layer.experts(exchange.rows, exchange.group_sizes), exchange)
        ye = moe.experts(mr.dispatch(x, plan), plan.group_sizes)
        expert = torch.repeat_interleave(torch.arange(E), plan.group_sizes.long())
        starts = torch.cumsum(plan.group_sizes, 0) - plan.group_sizes
        position = torch.arange(len(expert)) - starts[expert]
        ye[: len(expert)][position >= capacity] = 0
        torch.testing.assert_close(y, mr.combine(ye, plan))
    over = (plan.group_sizes - capacity).clamp(min=0).sum()
    assert int(exchange.rows_dropped) == int(over)
    kept = torch.tensor([int(plan.group_sizes.clamp(max=capacity).sum())])
    dist.all_reduce(kept)
    arrived = torch.tensor([int(exchange.group_sizes.sum())])
    dist.all_reduce(arrived)
    assert arrived == kept


def worker(rank, world):
    # Plain top-k: every assignment is real.
    assert check_matches_single_process(mr.TopK(num_experts=E, k=2), rank, world) == (
        world * TOKENS * 2
    )
    # AdaMoE null experts: fewer rows than T * k travel, exactly the real ones.
    real = check_matches_single_process(mr.NullExperts(num_experts=E, num_null=E, k=2), rank, world)
    assert real < world * TOKENS * 2
    # Static capacity large enough for everything: same results as dropless.
    check_matches_single_process(mr.TopK(num_experts=E, k=2), rank, world, capacity=TOKENS)
    # Static capacity too small: the overflow is dropped and counted.
    check_capacity_drops(rank, world, capacity=1)
    check_all_rows_to_one_expert(rank, world)
    with pytest.raises(ValueError, match=f"num_experts={world + 1}.*world size {world}"):
        ExpertParallelMoE(D, H, mr.TopK(num_experts=world + 1, k=1))


@pytest.mark.slow  # ranks on 2 shared cores: tens of seconds
@pytest.mark.parametrize(
    "world",
    [
        2,  # two ranks, four experts each
        4,  # four ranks, two experts each: ranks that receive nothing in the one-expert check
    ],
)
def test_expert_parallel_equals_single_process(world):
    run_ranks(worker, world)


@pytest.mark.parametrize(
    ("num_experts", "world_size"),
    [
        (6, 4),  # not a multiple
        (2, 4),  # fewer experts than ranks
        (0, 1),  # no experts at all
    ],
)
def test_uneven_experts_per_rank_rejected(num_experts, world_size):
    with pytest.raises(ValueError, match=f"num_experts={num_experts}.*world size {world_size}"):
        experts_per_rank(num_experts, world_size)


def test_experts_per_rank():
    assert experts_per_rank(8, 4) == 2
    assert experts_per_rank(8, 1) == 8


@pytest.fixture
def one_rank():
    """A world of one Gloo rank in this process (an in-memory store, nothing spawned)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def plan_of(tokens, seed=0):
    return mr.make_plan(mr.TopK(num_experts=E, k=2)(randn(tokens, E, seed=seed)))


@pytest.mark.parametrize(
    ("capacity", "error", "message"),
    [
        (True, TypeError, "capacity must be an int or None, got bool"),  # was taken as 1
        (False, TypeError, "capacity must be an int or None, got bool"),  # was taken as 0
        (2.0, TypeError, "capacity must be an int or None, got float"),  # not an index
        ("4", TypeError, "capacity must be an int or None, got str"),
        (0, ValueError, "capacity must be >= 1, got 0"),
        (-3, ValueError, "capacity must be >= 1, got -3"),
    ],
)
def test_dispatch_capacity_checked(one_rank, capacity, error, message):
    with pytest.raises(error, match=message):
        distributed.dispatch(randn(TOKENS, D, seed=1), plan_of(TOKENS), capacity=capacity)


def test_dispatch_capacity_accepts_any_index(one_rank):
    """A NumPy integer is an index, as for NumPy and the array API."""
    np = pytest.importorskip("numpy")
    x, plan = randn(TOKENS, D, seed=1), plan_of(TOKENS)
    exchange = distributed.dispatch(x, plan, capacity=np.int64(3))
    assert exchange.capacity == 3 and type(exchange.capacity) is int
    torch.testing.assert_close(exchange.rows, distributed.dispatch(x, plan, capacity=3).rows)


def test_padded_plan_refused(one_rank):
    """A padded plan's real rows are not the first sum(group_sizes): sending them would mix
    padding into the experts' rows."""
    routing = mr.TopK(num_experts=E, k=2, capacity_factor=1.0)(randn(TOKENS, E, seed=0))
    padded = mr.make_plan(routing, pad_to_capacity=True)
    with pytest.raises(ValueError, match="plan must be packed"):
        distributed.dispatch(randn(TOKENS, D, seed=1), padded)


@pytest.mark.parametrize("capacity", [None, 3])  # both transports
def test_zero_tokens_on_one_rank(one_rank, capacity):
    """T = 0 goes through both transports, forward and backward, to a (0, d) output."""
    empty = mr.make_plan(
        mr.Routing(
            token_ids=torch.zeros(0, dtype=torch.int32),
            expert_ids=torch.zeros(0, dtype=torch.int32),
            weights=torch.zeros(0),
            choice_ids=torch.zeros(0, dtype=torch.int32),
            probs=torch.zeros(0, E),
            finite_rows=torch.zeros(0, dtype=torch.bool),
            num_tokens=0,
            num_experts=E,
            layout="token",
            slots=2,
        )
    )
    x = torch.zeros(0, D, requires_grad=True)
    exchange = distributed.dispatch(x, empty, capacity=capacity)
    assert exchange.group_sizes.tolist() == [0] * E
    assert exchange.rows.shape == ((0 if capacity is None else E * capacity), D)
    y = distributed.combine(exchange.rows * 2, exchange)
    y.sum().backward()
    assert y.shape == (0, D) and x.grad.shape == (0, D)
