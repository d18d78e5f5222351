"""Expert parallelism over ``torch.distributed``: experts spread over the ranks of a process group.

Every rank routes its own tokens with the same policy, builds its own :class:`moerouter.Plan` and
sends each real row to the rank that holds its expert; the experts run there and
:func:`combine` sends their outputs back. Experts sit in contiguous blocks of ``E / world``:
rank ``r`` holds experts ``r * E_local .. (r + 1) * E_local - 1``.

Two transports:

* dropless (default): the ranks first exchange per-(rank, expert) row counts, then one
  ``all_to_all_single`` with uneven splits carries exactly the real rows. Rows of null experts
  and of dropped tokens (the rows past ``sum(group_sizes)``) are never sent. The split sizes
  are read on the host: one synchronisation per layer, as in Megatron-Core's all-to-all
  dispatcher.
* static capacity (``capacity=C``): every rank sends ``C`` rows per expert, padded with zeros,
  so every all-to-all has a fixed size and nothing is read on the host (CUDA graphs). Rows past
  ``C`` in an expert's group are dropped (their output is zero), as with token dropping.

The backward of each all-to-all is the reverse all-to-all, so gradients flow to ``x``, to the
local expert weights and through the combine weights to the router.

Before the rows move, every :func:`dispatch` gathers a small fixed-size header from each rank:
its settings (``num_experts``, hidden size, ``capacity``, dtype, gradient mode) and whether it
failed before the exchange. Mismatched settings raise a ``ValueError`` naming the setting on every
rank, where the all-to-all itself would abort the process (Gloo) or hang; a rank that raised
while routing makes its peers raise :class:`PeerRankError` at once instead of waiting for the
process-group timeout. A rank with no tokens takes part in every exchange like any other.
That agreement protocol lives in :mod:`moerouter_torch._agreement`.

**Size.** About 550 lines, kept as one module: the two transports, the :class:`Exchange` they
return and :func:`combine`, which reverses either, share their autograd functions and must be
read side by side; :class:`ExpertParallelMoE` is the layer built on them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import moerouter as mr
from moerouter_torch._agreement import (
    _BUILD,
    _DISPATCH,
    _NONE,
    PeerRankError,
    _agree,
    _code,
    _header_device,
)
from moerouter_torch._agreement import (
    _HEADER_SIZE as _HEADER_SIZE,  # read by the simulator test and the distributed benchmark
)
from moerouter_torch.nn import Activation, GroupedMLP

__all__ = [
    "Exchange",
    "ExpertParallelMoE",
    "PeerRankError",
    "combine",
    "dispatch",
    "experts_per_rank",
]


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """``E / world``: how many contiguous experts each rank holds.

    Raises
    ------
    ValueError
        When ``num_experts`` is not a positive multiple of ``world_size``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if num_experts < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} must be a positive multiple of the world size "
            f"{world_size}: expert parallelism places num_experts / world_size experts per rank"
        )
    return num_experts // world_size


def _check_capacity(capacity: object) -> int | None:
    """``capacity`` as an int >= 1, or None; ``True`` is refused rather than taken as 1."""
    if capacity is None:
        return None
    if isinstance(capacity, bool):
        raise TypeError("capacity must be an int or None, got bool")
    try:
        value = operator.index(capacity)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__}") from None
    if value < 1:
        raise ValueError(f"capacity must be >= 1, got {value}")
    return value


def _all_to_all_rows(
    rows: torch.Tensor,
    output_splits: list[int] | None,
    input_splits: list[int] | None,
    group: Any,
) -> torch.Tensor:
    num_out = rows.shape[0] if output_splits is None else sum(output_splits)
    out = rows.new_empty((num_out, rows.shape[1]))
    dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on rows; the backward is the reverse all-to-all (splits swapped)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        output_splits: list[int] | None,
        input_splits: list[int] | None,
        group: Any,
    ) -> torch.Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _all_to_all_rows(rows, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        return _all_to_all_rows(grad, input_splits, output_splits, ctx.group), None, None, None


class _Permute(torch.autograd.Function):
    """``rows[permutation]``; the backward gathers with the inverse permutation (no scatter)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, permutation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass(frozen=True)
class Exchange:
    """What :func:`dispatch` delivered to this rank, and what :func:`combine` needs to send back.

    Attributes
    ----------
    rows : tensor (N, d)
        Rows for this rank's experts, grouped by local expert (local expert 0 first), then by
        source rank, then in each source's dispatch order. In capacity mode ``N = E * C``: the
        real rows first, zero padding after ``sum(group_sizes)`` (the layout of a plan).
    group_sizes : tensor (E_local,) int32
        Real rows per local expert: feed it to the experts with ``rows``.
    plan : Plan
        This rank's plan, for the final combine.
    rows_sent : tensor () int64
        Rows this rank sent (real rows in dropless mode, ``E * C`` in capacity mode).
    rows_dropped : tensor () int64
        Real rows that did not fit the capacity (always 0 in dropless mode).
    send_splits, recv_splits : list of int, or None
        Rows sent to / received from each rank (dropless mode; None in capacity mode).
    capacity : int or None
        ``C``, rows per expert per source rank, in capacity mode.
    """

    rows: torch.Tensor
    group_sizes: torch.Tensor
    plan: mr.Plan
    rows_sent: torch.Tensor
    rows_dropped: torch.Tensor
    send_splits: list[int] | None
    recv_splits: list[int] | None
    capacity: int | None
    group: Any
    world_size: int
    _regroup: torch.Tensor
    _restore: torch.Tensor


def dispatch(
    x: torch.Tensor, plan: mr.Plan, *, group: Any = None, capacity: int | None = None
) -> Exchange:
    """Send this rank's routed rows to the ranks that hold their experts.

    Parameters
    ----------
    x : tensor (T, d)
        This rank's tokens.
    plan : Plan
        :func:`moerouter.make_plan` of this rank's routing over all ``E`` experts.
    group : ProcessGroup, optional
        The expert-parallel group; the default group when omitted.
    capacity : int, optional
        Static mode: rows per expert sent by each rank (an int >= 1), padded with zeros; rows
        past it are dropped. Dropless with exact, uneven splits when omitted.

    Returns
    -------
    Exchange
        ``exchange.rows`` and ``exchange.group_sizes`` go to the local experts; their output goes
        to :func:`combine` with the exchange.

    Raises
    ------
    ValueError
        On every rank, when the ranks disagree on ``num_experts``, the hidden size, ``capacity``,
        the dtype of ``x`` or the gradient mode (the message names the setting and each rank's
        value); or when ``num_experts`` is not a multiple of the group size.
    PeerRankError
        On every rank whose own call was fine, when another rank's call failed before the
        exchange (bad ``plan``, ``x`` or ``capacity``); that rank raises its own error.

    Every rank of the group must call it, also a rank with no tokens (``T = 0``): it sends
    nothing, still receives its experts' rows, and gets a ``(0, d)`` output from :func:`combine`.

    Examples
    --------
    .. skip-example
    .. code-block:: python

       plan = mr.make_plan(router(gate(x)))
       exchange = distributed.dispatch(x, plan)
       ye = local_experts(exchange.rows, exchange.group_sizes)
       y = distributed.combine(ye, exchange)
    """
    return _dispatch(x, plan, group, capacity, None)


def _exchange_settings(plan: mr.Plan, xe: torch.Tensor, capacity: int | None) -> dict[str, int]:
    """What must be equal on every rank for the all-to-alls (and their backward) to pair up."""
    return {
        "num_experts": plan.num_experts,
        "hidden size (x.shape[-1])": xe.shape[1],
        "capacity": _NONE if capacity is None else capacity,
        "dtype": _code(str(xe.dtype)),
        # A rank that records no graph skips the reverse all-to-alls its peers wait for.
        "torch.is_grad_enabled()": int(torch.is_grad_enabled()),
        "x.requires_grad": int(xe.requires_grad),
    }


def _dispatch(
    x: torch.Tensor | None,
    plan: mr.Plan | None,
    group: Any,
    capacity: object,
    failure: Exception | None,
) -> Exchange:
    """:func:`dispatch` for a rank that may already have failed (``failure``): it still sends
    its header, so its peers raise instead of waiting for it."""
    world = dist.get_world_size(group)
    settings: dict[str, int] = {}
    if failure is None:
        try:
            capacity = _check_capacity(capacity)
            if not isinstance(plan, mr.Plan):
                raise TypeError(f"plan must be a moerouter.Plan, got {type(plan).__name__}")
            if plan.capacity is not None:
                raise ValueError(
                    "plan must be packed (make_plan without pad_to_capacity): its real rows are "
                    "sent by expert; for static sizes pass capacity= instead"
                )
            local = experts_per_rank(plan.num_experts, world)
            xe = mr.dispatch(x, plan)
            settings = _exchange_settings(plan, xe, capacity)
        except Exception as error:
            failure = error
    preferred = x.device if isinstance(x, torch.Tensor) else None
    _agree(group, _header_device(group, preferred), _DISPATCH, settings, failure)
    # Past the header every rank is healthy and agrees on the settings.
    if capacity is not None:
        return _dispatch_capacity(xe, plan, group, world, local, capacity)

    counts = plan.group_sizes.to(torch.int64)
    recv_counts = torch.empty_like(counts)
    # Chunk r of the counts (rank r's experts) goes to rank r; chunk s of what arrives is what
    # rank s sends to each of this rank's experts.
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.reshape(world, local)
    # Uneven all-to-all needs its split sizes on the host: one synchronisation.
    send_splits = counts.reshape(world, local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    num_sent = sum(send_splits)
    received = _AllToAll.apply(xe[:num_sent], recv_splits, send_splits, group)

    # Received rows come in (source rank, local expert) blocks; the experts want them by local
    # expert, then source rank.
    num_received = received.shape[0]
    block_starts = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
    by_expert_counts = recv_counts.t().reshape(-1)
    by_expert_starts = block_starts.reshape(world, local).t().reshape(-1)
    position = torch.arange(num_received, device=xe.device)
    first_of_block = torch.cumsum(by_expert_counts, 0) - by_expert_counts
    regroup = torch.repeat_interleave(
        by_expert_starts - first_of_block, by_expert_counts, output_size=num_received
    )
    regroup = regroup + position
    restore = torch.empty_like(regroup)
    restore[regroup] = position
    rows = _Permute.apply(received, regroup, restore)
    return Exchange(
        rows=rows,
        group_sizes=recv_counts.sum(0).to(torch.int32),
        plan=plan,
        rows_sent=torch.tensor(num_sent, dtype=torch.int64, device=xe.device),
        rows_dropped=torch.zeros((), dtype=torch.int64, device=xe.device),
        send_splits=send_splits,
        recv_splits=recv_splits,
        capacity=None,
        group=group,
        world_size=world,
        _regroup=regroup,
        _restore=restore,
    )


def _capacity_slots(plan: mr.Plan, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch row of each (expert, slot), or -1 for padding; and the rows kept per expert."""
    sizes = plan.group_sizes.to(torch.int64)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(capacity, device=sizes.device)
    filled = slot[None, :] < sizes[:, None]
    source_rows = torch.where(filled, starts[:, None] + slot[None, :], -1)
    return source_rows.reshape(-1), torch.clamp(sizes, max=capacity)


def _dispatch_capacity(
    xe: torch.Tensor, plan: mr.Plan, group: Any, world: int, local: int, capacity: int
) -> Exchange:
    source_rows, kept = _capacity_slots(plan, capacity)
    padded = torch.cat([xe, xe.new_zeros((1, xe.shape[1]))])
    zero_row = xe.shape[0]
    send = padded[torch.where(source_rows >= 0, source_rows, zero_row)]
    # Equal splits: block r (rank r's experts, C slots each) goes to rank r. The kept counts
    # travel too, so nothing is read on the host.
    received = _AllToAll.apply(send, None, None, group)
    recv_kept = torch.empty_like(kept)
    dist.all_to_all_single(recv_kept, kept, group=group)
    recv_kept = recv_kept.reshape(world, local)

    # Slot (source s, local expert j, c) is real when c < recv_kept[s, j]. Regroup by local
    # expert with the real rows first, the plan layout, so the experts skip the padding.
    slot = torch.arange(capacity, device=xe.device)
    real = slot[None, None, :] < recv_kept[:, :, None]
    expert = torch.arange(local, device=xe.device)[None, :, None].expand(real.shape)
    key = torch.where(real, expert, local).reshape(-1)
    regroup = torch.sort(key, stable=True).indices
    restore = torch.empty_like(regroup)
    restore[regroup] = torch.arange(regroup.shape[0], device=xe.device)
    return Exchange(
        rows=_Permute.apply(received, regroup, restore),
        group_sizes=recv_kept.sum(0).to(torch.int32),
        plan=plan,
        rows_sent=torch.tensor(send.shape[0], dtype=torch.int64, device=xe.device),
        rows_dropped=plan.group_sizes.sum() - kept.sum(),
        send_splits=None,
        recv_splits=None,
        capacity=capacity,
        group=group,
        world_size=world,
        _regroup=regroup,
        _restore=restore,
    )


def combine(ye: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Send expert outputs back to the ranks their tokens came from and combine them there.

    Parameters
    ----------
    ye : tensor (N, d)
        The local experts' outputs for ``exchange.rows``, in the same order.
    exchange : Exchange
        From :func:`dispatch`.

    Returns
    -------
    tensor (T, d)
        :func:`moerouter.combine` of this rank's tokens, as if every expert were local.
    """
    if not isinstance(exchange, Exchange):
        raise TypeError(f"exchange must be a moerouter_torch.distributed.Exchange, got {exchange}")
    if ye.ndim != 2 or ye.shape[0] != exchange.rows.shape[0]:
        raise ValueError(
            f"ye must have shape ({exchange.rows.shape[0]}, d) like exchange.rows, "
            f"got {tuple(ye.shape)}"
        )
    plan = exchange.plan
    width = ye.shape[1]
    back = _Permute.apply(ye, exchange._restore, exchange._regroup)
    if exchange.capacity is None:
        returned = _AllToAll.apply(back, exchange.send_splits, exchange.recv_splits, exchange.group)
        spare = ye.new_zeros((plan.num_rows - returned.shape[0], width))
        return mr.combine(torch.cat([returned, spare]), plan)

    capacity = exchange.capacity
    returned = _AllToAll.apply(back, None, None, exchange.group)
    # Dispatch row i of expert e at position p reads slot e * C + p when p < C.
    sizes = plan.group_sizes.to(torch.int64)
    ends = torch.cumsum(sizes, 0)
    row = torch.arange(plan.num_rows, device=ye.device)
    expert = torch.searchsorted(ends, row, right=True)
    real = expert < plan.num_experts
    expert = torch.clamp(expert, max=plan.num_experts - 1)
    position = row - (ends[expert] - sizes[expert])
    kept = real & (position < capacity)
    padded = torch.cat([returned, returned.new_zeros((1, width))])
    slot = torch.where(kept, expert * capacity + position, returned.shape[0])
    return mr.combine(padded[slot], plan)


class ExpertParallelMoE(nn.Module):
    """:class:`moerouter_torch.MoE` with its experts spread over a process group.

    Each rank holds the whole gate (replicated) and only its ``E / world`` experts
    (``self.experts`` is a :class:`GroupedMLP` over the local experts, globally experts
    ``first_expert .. first_expert + E_local - 1``). Forward routes this rank's tokens, sends
    each real row to its expert's rank (:func:`dispatch`), runs the local experts and sends the
    outputs back (:func:`combine`). With the same weights, the outputs and gradients equal those
    of the single-process :class:`~moerouter_torch.MoE` over all ranks' tokens, for policies
    that route each token on its own (top-k, null experts); the gate's gradient is this rank's
    share, to be summed over ranks (all-reduce) like any replicated parameter.

    Parameters
    ----------
    hidden_size, intermediate_size, router, activation, device, dtype
        As for :class:`moerouter_torch.MoE`.
    group : ProcessGroup, optional
        Expert-parallel group; the default group when omitted.
    capacity : int, optional
        Static all-to-all sizes (see :func:`dispatch`).

    Returns (from ``forward``)
    --------------------------
    (y, losses)
        As :class:`moerouter_torch.MoE`; the balancing losses are this rank's (micro-batch
        scope), not reduced over the group.

    Raises
    ------
    ValueError
        At construction, on every rank, when the ranks disagree on ``num_experts``,
        ``num_null``, ``hidden_size``, ``intermediate_size``, ``capacity``, ``dtype`` or
        ``activation`` (the message names the setting and each rank's value).
    PeerRankError
        On every other rank, when one rank fails while building the layer, or in ``forward``
        before its tokens leave (gate, router, plan, losses): that rank raises its own error.

    Every rank must construct the layer and run every forward (and backward) together, also a
    rank with no tokens: it routes nothing, sends nothing and still serves its experts.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        router: Any,
        *,
        group: Any = None,
        capacity: int | None = None,
        activation: Activation = "swiglu",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        world = dist.get_world_size(group)
        settings: dict[str, int] = {}
        failure = None
        try:
            capacity = _check_capacity(capacity)
            num_experts = operator.index(router.num_experts)
            local = experts_per_rank(num_experts, world)
            num_null = operator.index(getattr(router, "num_null", 0))
            settings = {
                "num_experts": num_experts,
                "num_null": num_null,
                "hidden_size": operator.index(hidden_size),
                "intermediate_size": operator.index(intermediate_size),
                "capacity": _NONE if capacity is None else capacity,
                "dtype": _code(str(torch.get_default_dtype() if dtype is None else dtype)),
                "activation": _code(str(activation)),
            }
        except Exception as error:
            failure = error
        preferred = None if device is None else torch.device(device)
        _agree(group, _header_device(group, preferred), _BUILD, settings, failure)
        self.router = router
        self.group = group
        self.capacity = capacity
        self.first_expert = dist.get_rank(group) * local
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, num_experts + num_null, bias=False, **factory)
        self.experts = GroupedMLP(
            local, hidden_size, intermediate_size, activation=activation, **factory
        )

    @classmethod
    def from_moe(
        cls, moe: nn.Module, *, group: Any = None, capacity: int | None = None
    ) -> ExpertParallelMoE:
        """This rank's share of a single-process :class:`moerouter_torch.MoE` (weights copied)."""
        try:
            if getattr(moe, "shared", None) is not None:
                raise ValueError("moe has shared experts, which ExpertParallelMoE does not hold")
            w_in = moe.experts.w_in
            sizes = (w_in.shape[1], moe.experts.w_out.shape[1], moe.router)
            options = {"activation": moe.experts.activation, "device": w_in.device}
        except Exception as error:
            # The peers are about to build their layer: they must hear of this failure.
            _agree(group, _header_device(group, None), _BUILD, {}, error)
            raise  # not reached: _agree re-raises the error once the peers know
        layer = cls(*sizes, group=group, capacity=capacity, dtype=w_in.dtype, **options)
        local = layer.experts.num_experts
        block = slice(layer.first_expert, layer.first_expert + local)
        with torch.no_grad():
            layer.gate.weight.copy_(moe.gate.weight)
            layer.experts.w_in.copy_(w_in[block])
            layer.experts.w_out.copy_(moe.experts.w_out[block])
        return layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (..., d) -> (``y`` (..., d), losses).

        Everything that can fail on this rank alone (gate, router, plan, losses) runs before
        the first exchange, so a failure there reaches the peers as :class:`PeerRankError`.
        """
        tokens = plan = None
        failure = None
        try:
            tokens = x.reshape(-1, x.shape[-1])
            logits = self.gate(tokens)
            routing = self.router(logits)
            plan = mr.make_plan(routing)
            if getattr(self.router, "num_null", 0):
                balance = mr.losses.null_load_balancing(routing)
            else:
                balance = mr.losses.load_balancing(routing)
            losses = {"load_balancing": balance, "z_loss": mr.losses.z_loss(logits)}
        except Exception as error:
            failure = error
        exchange = _dispatch(tokens, plan, self.group, self.capacity, failure)
        y = combine(self.experts(exchange.rows, exchange.group_sizes), exchange)
        return y.reshape(x.shape), losses
