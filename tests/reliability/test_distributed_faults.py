"""Expert parallelism under faults, on 2 and 4 Gloo ranks: the failure model, checked.

* A rank with no tokens (uneven batches, the last micro-batch, serving) takes part in every
  exchange, forward and backward; every rank's outputs and gradients still equal the
  single-process layer's.
* Settings that differ across ranks (``num_experts``, ``capacity``, the hidden size, the dtype)
  raise a ``ValueError`` naming the setting on every rank, where Gloo used to abort the process.
* A rank that raises before its rows leave (bad input, a policy's error, a bad argument) makes
  every peer raise ``PeerRankError`` at once instead of waiting for the process-group timeout,
  and the group stays usable.
* A rank that raises between dispatch and combine while staying alive still leaves its peers
  waiting until the process-group timeout: the last test shows that limit.

Every test ends by itself: collectives time out after 20 seconds, and the launcher
(``moerouter_torch._ranks.run_ranks``) kills ranks still alive after 55 seconds, so a hang fails
the test instead of stalling CI.
"""

import re
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moerouter_torch")

import torch.distributed as dist  # noqa: E402
from moerouter_torch import MoE, distributed  # noqa: E402
from moerouter_torch._ranks import run_ranks  # noqa: E402
from moerouter_torch.distributed import ExpertParallelMoE, PeerRankError  # noqa: E402

import moerouter as mr  # noqa: E402

TOKENS, D, H, E, K = 4, 8, 12, 8, 2  # tokens per non-empty rank; 8 experts over 2 or 4 ranks

pytestmark = pytest.mark.slow  # rank processes on 2 shared cores: seconds each


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def empty_routing(num_experts, k, logits):
    """The routing of zero tokens, built by hand: the exchange must not depend on the core's
    policies, which refuse T = 0 until the core's zero-token fix lands (issue 14, item 9)."""
    no_ids = torch.zeros(0, dtype=torch.int32)
    probs = torch.softmax(logits.float(), dim=-1)
    return mr.Routing(
        token_ids=no_ids,
        expert_ids=no_ids,
        weights=probs.reshape(-1),  # empty, but in the graph: the gate gets a (zero) gradient
        choice_ids=no_ids,
        probs=probs,
        finite_rows=torch.zeros(0, dtype=torch.bool),
        num_tokens=0,
        num_experts=num_experts,
        layout="token",
        slots=k,
    )


class ZeroTokenTopK:
    """``mr.TopK`` that routes zero tokens with :func:`empty_routing`."""

    def __init__(self, num_experts, k):
        self.num_experts = num_experts
        self.policy = mr.TopK(num_experts=num_experts, k=k)

    def __call__(self, logits):
        if logits.shape[0] == 0:
            return empty_routing(self.num_experts, self.policy.k, logits)
        return self.policy(logits)


def linear_experts(rows, group_sizes, weights):
    """One linear map per expert on moerouter-grouped rows; zero past ``sum(group_sizes)``."""
    expert = torch.repeat_interleave(torch.arange(len(group_sizes)), group_sizes.long())
    real = torch.einsum("nd,nde->ne", rows[: len(expert)], weights[expert])
    return torch.cat([real, rows.new_zeros(rows.shape[0] - len(expert), rows.shape[1])])


def my_slice(counts, rank):
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


# --- zero tokens ----------------------------------------------------------------------------


def check_zero_tokens_functions(rank, world, counts_cases):
    """dispatch/combine with some or all ranks at T = 0: both transports, forward and backward."""
    block = slice(rank * (E // world), (rank + 1) * (E // world))
    for counts in counts_cases:
        total = sum(counts)
        x_all, upstream = randn(total, D, seed=1), randn(total, D, seed=2)
        gate, weights = randn(D, E, seed=3), randn(E, D, D, seed=4) / D**0.5
        router = ZeroTokenTopK(E, K)
        if total:
            x_ref, w_ref = x_all.clone().requires_grad_(), weights.clone().requires_grad_()
            plan = mr.make_plan(router(x_ref @ gate))
            y_ref = mr.combine(
                linear_experts(mr.dispatch(x_ref, plan), plan.group_sizes, w_ref), plan
            )
            (y_ref * upstream).sum().backward()
        mine = my_slice(counts, rank)
        for capacity in (None, TOKENS * K):  # dropless; static, large enough to drop nothing
            x = x_all[mine].clone().requires_grad_()
            w_local = weights[block].clone().requires_grad_()
            plan = mr.make_plan(router(x @ gate))
            exchange = distributed.dispatch(x, plan, capacity=capacity)
            ye = linear_experts(exchange.rows, exchange.group_sizes, w_local)
            y = distributed.combine(ye, exchange)
            (y * upstream[mine]).sum().backward()  # the reverse all-to-alls, on every rank
            what = f"counts {counts}, capacity {capacity}, rank {rank}"
            assert y.shape == (counts[rank], D), what
            assert x.grad.shape == (counts[rank], D), what
            if total:
                torch.testing.assert_close(y, y_ref[mine], msg=what)
                torch.testing.assert_close(x.grad, x_ref.grad[mine], msg=what)
                torch.testing.assert_close(w_local.grad, w_ref.grad[block], msg=what)
            else:
                assert int(exchange.group_sizes.sum()) == 0, what
                assert not w_local.grad.any(), what
            if counts[rank] == 0:
                assert int(exchange.rows_sent) == (0 if capacity is None else E * capacity), what


def check_zero_tokens_layer(rank, world, counts_cases):
    """ExpertParallelMoE with some or all ranks at T = 0, forward and backward."""
    block = slice(rank * (E // world), (rank + 1) * (E // world))
    for counts in counts_cases:
        total = sum(counts)
        torch.manual_seed(0)
        moe = MoE(D, H, ZeroTokenTopK(E, K), activation="gelu")
        x_all, upstream = randn(total, D, seed=1), randn(total, D, seed=2)
        if total:
            x_ref = x_all.clone().requires_grad_()
            y_ref, _ = moe(x_ref)
            (y_ref * upstream).sum().backward()
        mine = my_slice(counts, rank)
        for capacity in (None, TOKENS * K):
            layer = ExpertParallelMoE.from_moe(moe, capacity=capacity)
            x = x_all[mine].clone().requires_grad_()
            y, _ = layer(x)
            (y * upstream[mine]).sum().backward()
            dist.all_reduce(layer.gate.weight.grad)  # the replicated gate: sum the shares
            what = f"counts {counts}, capacity {capacity}, rank {rank}"
            assert y.shape == (counts[rank], D), what
            if total:
                torch.testing.assert_close(y, y_ref[mine], msg=what)
                torch.testing.assert_close(x.grad, x_ref.grad[mine], msg=what)
                want = moe.experts.w_in.grad[block]
                torch.testing.assert_close(layer.experts.w_in.grad, want, msg=what)
                torch.testing.assert_close(layer.gate.weight.grad, moe.gate.weight.grad, msg=what)
            else:
                assert not layer.experts.w_in.grad.any(), what
                assert not layer.gate.weight.grad.any(), what


def zero_token_cases(world):
    return [
        [TOKENS] * (world - 1) + [0],  # the last rank is empty (the last micro-batch)
        [0] + [TOKENS] * (world - 1),  # rank 0 is empty: it still serves its experts
        [0] * world,  # every rank is empty: every exchange still happens
    ]


@pytest.mark.parametrize("world", [2, 4])  # 4: two experts per rank, ranks 1.. serve nothing
def test_zero_token_ranks_dispatch_and_combine(world):
    run_ranks(check_zero_tokens_functions, world, zero_token_cases(world))


@pytest.mark.parametrize("world", [2, 4])
def test_zero_token_ranks_layer(world):
    run_ranks(check_zero_tokens_layer, world, zero_token_cases(world))


def check_core_policy_zero_tokens(rank, world):
    """The layer with the plain ``mr.TopK`` and an empty rank: needs the core's T = 0 fix."""
    torch.manual_seed(0)
    layer = ExpertParallelMoE(D, H, mr.TopK(num_experts=E, k=K))
    x = randn(0 if rank == 1 else TOKENS, D, seed=rank).requires_grad_()
    y, _ = layer(x)
    y.sum().backward()
    assert y.shape == x.shape


def test_zero_token_rank_with_core_policy():
    run_ranks(check_core_policy_zero_tokens, 2)


# --- mismatched settings ----------------------------------------------------------------------


def raises_in_step(error, pattern, call, *args, **kwargs):
    """``call`` raises ``error`` matching ``pattern`` on this rank; then the group is in step."""
    with pytest.raises(error, match=pattern):
        call(*args, **kwargs)
    dist.barrier()


def check_mismatched_settings(rank, world):
    last = rank == world - 1  # the odd one out
    x, logits = randn(TOKENS, D, seed=rank), randn(TOKENS, E, seed=10 + rank)
    plan = mr.make_plan(mr.TopK(num_experts=E, k=K)(logits))
    wide_plan = mr.make_plan(mr.TopK(num_experts=2 * E, k=K)(randn(TOKENS, 2 * E, seed=rank)))
    wide_x = randn(TOKENS, 2 * D, seed=rank)
    cases = [
        # (setting named in the error, this rank's dispatch arguments): each used to abort Gloo
        ("num_experts", (x, wide_plan if last else plan, None)),
        ("capacity", (x, plan, 8 if last else 4)),
        ("capacity", (x, plan, 4 if last else None)),  # static on one rank, dropless elsewhere
        ("hidden size", (wide_x if last else x, plan, None)),
        ("dtype", (x.double() if last else x, plan, None)),
        # Gradients wanted on one rank only: its backward would wait for the others forever.
        ("x.requires_grad", (x.clone().requires_grad_() if last else x, plan, None)),
    ]
    for setting, (tokens, tokens_plan, capacity) in cases:
        pattern = re.escape(setting) + " .* on rank 0"
        raises_in_step(
            ValueError, pattern, distributed.dispatch, tokens, tokens_plan, capacity=capacity
        )
    # The values each rank holds are in the message.
    values = rf"num_experts is {E} on rank 0, .*{2 * E} on rank {world - 1}"
    raises_in_step(ValueError, values, distributed.dispatch, x, wide_plan if last else plan)

    # The layer checks its settings once, at construction.
    layer_cases = [
        ("num_experts", {"router": mr.TopK(num_experts=2 * E if last else E, k=K)}),
        ("capacity", {"capacity": 8 if last else 4}),
        ("hidden_size", {"hidden_size": 2 * D if last else D}),
        ("intermediate_size", {"intermediate_size": 2 * H if last else H}),
        ("dtype", {"dtype": torch.float64 if last else torch.float32}),
    ]
    for setting, changed in layer_cases:
        arguments = {"hidden_size": D, "intermediate_size": H, "router": mr.TopK(E, K)}
        pattern = re.escape(setting) + " .* on rank 0"
        raises_in_step(ValueError, pattern, ExpertParallelMoE, **{**arguments, **changed})
    # A number of experts that one rank alone cannot spread: that rank raises its own error,
    # and its peers learn of it rather than wait.
    odd = mr.TopK(num_experts=world + 1 if last else E, k=1)
    error = ValueError if last else PeerRankError
    raises_in_step(error, f"num_experts={world + 1}", ExpertParallelMoE, D, H, odd)

    # Grad mode on one rank only.
    with torch.set_grad_enabled(not last):
        pattern = re.escape("torch.is_grad_enabled() is True on rank 0")
        raises_in_step(ValueError, pattern, distributed.dispatch, x, plan)
    # Ranks at different exchanges (a program that diverged): named, on every rank.
    pattern = r"at different exchanges \(rank 0 in dispatch, .*building an ExpertParallelMoE"
    if last:
        raises_in_step(RuntimeError, pattern, ExpertParallelMoE, D, H, mr.TopK(E, K))
    else:
        raises_in_step(RuntimeError, pattern, distributed.dispatch, x, plan)

    # Everything agreed: the same calls go through.
    exchange = distributed.dispatch(x, plan)
    assert exchange.rows.shape[1] == D
    ExpertParallelMoE(D, H, mr.TopK(E, K), capacity=4)


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_settings_raise_on_every_rank(world):
    run_ranks(check_mismatched_settings, world)


# --- a rank that raises before its rows leave ---------------------------------------------------


def check_rank_raises_mid_forward(rank, world):
    failing = rank == 1
    torch.manual_seed(0)
    layer = ExpertParallelMoE(D, H, mr.TopK(num_experts=E, k=K, strict=True))
    x = randn(TOKENS, D, seed=rank)
    peer = re.escape("rank 1 of the expert-parallel group raised before the exchange")
    cases = [
        # (what rank 1 feeds the layer, its own error, text its peers' error repeats)
        (randn(TOKENS, D + 1, seed=1), RuntimeError, "RuntimeError"),  # the gate's matmul
        (torch.full((TOKENS, D), float("nan")), ValueError, "ValueError"),  # strict policy
        ("not a tensor", AttributeError, "AttributeError"),
    ]
    for bad, own_error, text in cases:
        if failing:
            raises_in_step(own_error, "", layer, bad)
        else:
            raises_in_step(PeerRankError, f"{peer}.*{text}", layer, x)

    # dispatch itself: a bad argument on one rank.
    plan = mr.make_plan(mr.TopK(num_experts=E, k=K)(randn(TOKENS, E, seed=rank)))
    calls = [
        ({"capacity": True}, TypeError, "capacity must be an int or None, got bool"),
        ({"capacity": 0}, ValueError, "capacity must be >= 1, got 0"),
        ({"plan": "plan"}, TypeError, "plan must be a moerouter.Plan"),
    ]
    for bad, own_error, text in calls:
        arguments = {"plan": plan, "capacity": None, **(bad if failing else {})}
        error = own_error if failing else PeerRankError
        raises_in_step(error, re.escape(text), distributed.dispatch, x, **arguments)

    # from_moe: one rank's model is not a MoE.
    torch.manual_seed(0)
    moe = MoE(D, H, mr.TopK(num_experts=E, k=K))
    if failing:
        raises_in_step(AttributeError, "", ExpertParallelMoE.from_moe, "not a MoE")
    else:
        raises_in_step(PeerRankError, f"{peer}.*AttributeError", ExpertParallelMoE.from_moe, moe)

    # The group is still in step: the next forward and backward work on every rank.
    x.requires_grad_()
    y, _ = layer(x)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("world", [2, 4])
def test_rank_raising_before_the_exchange_stops_every_rank(world):
    run_ranks(check_rank_raises_mid_forward, world)


# --- the limit: an error between dispatch and combine ---------------------------------------


def check_error_in_the_experts(rank, world, timeout):
    """Rank 1's experts raise after dispatch; it stays alive. Its peers, already in combine's
    all-to-all, cannot know: they wait for the process-group timeout, then raise."""
    plan = mr.make_plan(mr.TopK(num_experts=E, k=K)(randn(TOKENS, E, seed=rank)))
    x = randn(TOKENS, D, seed=rank)
    exchange = distributed.dispatch(x, plan)
    if rank == 1:
        time.sleep(timeout + 5)  # "raised" in the experts, alive, never reaching combine
        return
    with pytest.raises(RuntimeError, match=r"(?i)time"):
        distributed.combine(exchange.rows, exchange)


def test_error_between_dispatch_and_combine_waits_for_the_timeout():
    run_ranks(check_error_in_the_experts, 2, 5, timeout=5)
