"""The kernels in plain PyTorch: the CPU path, and the fallback on any device without Triton.

Every kernel is a gather (``index_select``) or a fixed-order gather-reduce (``embedding_bag``,
sequential per token): no atomics and no scatter-add, so results are bit-identical run to run and
a token's output never depends on how other tokens were routed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moerouter_torch._workspace import workspace

# float32 = hi + mid + lo in bfloat16 (8 significant bits each); float16 needs no more.
_WEIGHT_PARTS = 3


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return workspace(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _stable_order(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Indices that sort the non-negative ``keys`` (< ``num_keys``) stably; int64.

    Narrow keys take fewer radix passes. On CPU NumPy's single-threaded radix sort (int16 keys)
    is used: torch's parallel sort pays a thread barrier per pass, which costs a scheduler time
    slice each when the cores are shared (measured 40 ms vs 0.2 ms at T*k = 32768 under load).
    """
    narrow = torch.int16 if num_keys <= torch.iinfo(torch.int16).max else torch.int32
    if keys.device.type == "cpu":
        numpy_keys = keys.to(narrow).numpy()
        return torch.from_numpy(np.argsort(numpy_keys, kind="stable").astype(np.int64))
    return torch.sort(keys.to(narrow), stable=True).indices


def plan_indices(
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    fan_in: int,
    token_layout: bool,
) -> tuple[torch.Tensor, ...]:
    """Integer arrays of a Plan, plus the assignment each combine slot reads (``combine_slots``).

    Counting sort by expert: a histogram of the keys (experts, "no expert" last) gives
    ``group_sizes`` and ``num_valid``; a stable radix sort of the narrow keys gives the order.
    """
    device = expert_ids.device
    int32 = torch.int32
    num_rows = expert_ids.shape[0]
    real = expert_ids >= 0
    key = torch.where(real, expert_ids, num_experts)
    order = _stable_order(key, num_experts + 1)
    counts = torch.bincount(key, minlength=num_experts + 1)
    positions = torch.arange(num_rows, dtype=int32, device=device)
    inverse = torch.empty(num_rows, dtype=int32, device=device)
    inverse.index_copy_(0, order, positions)  # order is a permutation: no two writes collide
    order = order.to(int32)
    group_sizes = counts[:num_experts].to(int32)
    num_valid = (num_rows - counts[num_experts]).to(int32)
    source_tokens = token_ids.index_select(0, order).to(int32)
    masked_rows = torch.where(real, inverse, -1)
    if token_layout:
        combine_rows = masked_rows.reshape(num_tokens, fan_in)
        combine_slots = torch.where(real, positions, -1).reshape(num_tokens, fan_in)
    else:
        # Assignments sorted by token (stable: expert order kept inside a token); each token
        # reads its run, padded to fan_in.
        by_token = _stable_order(token_ids, num_tokens)
        per_token = torch.bincount(token_ids, minlength=num_tokens)
        starts = torch.cumsum(per_token, 0) - per_token
        slot_range = torch.arange(fan_in, device=device)
        present = slot_range[None, :] < per_token[:, None]
        slot = (starts[:, None] + slot_range[None, :]).clamp_(max=max(num_rows - 1, 0))
        assignment = by_token[slot.reshape(-1)].reshape(num_tokens, fan_in)
        combine_rows = torch.where(present, masked_rows[assignment], -1)
        combine_slots = torch.where(combine_rows >= 0, assignment.to(int32), -1)
    return (
        group_sizes,
        order,
        inverse,
        source_tokens,
        num_valid,
        combine_rows.to(int32).contiguous(),
        combine_slots.to(int32).contiguous(),
    )


def dispatch(x: torch.Tensor, source_tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """``xe[i] = x[source_tokens[i]]`` for ``i < num_valid``, zero after."""
    num_rows = source_tokens.shape[0]
    valid = int(num_valid)
    out = _empty((num_rows, x.shape[1]), x.dtype, x.device)
    torch.index_select(x, 0, source_tokens[:valid], out=out[:valid])
    out[valid:].zero_()
    return out


def _csr(
    combine_rows: torch.Tensor, combine_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The real entries of ``combine_rows`` in token-major order, with per-token offsets."""
    flat = combine_rows.reshape(-1)
    present = flat >= 0
    rows = flat[present]
    counts = present.reshape(combine_rows.shape).sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    weights = None if combine_weights is None else combine_weights.reshape(-1)[present]
    return rows.to(torch.int64), offsets, weights


def gather_reduce(
    ye: torch.Tensor, combine_rows: torch.Tensor, combine_weights: torch.Tensor | None
) -> torch.Tensor:
    """``y[t] = sum_f w[t, f] * ye[rows[t, f]]`` over ``rows >= 0``, in the order of ``f``.

    Accumulates in float32 (float64 for float64 ``ye``). Without weights, a plain sum: the
    gradient of dispatch.
    """
    rows, offsets, weights = _csr(combine_rows, combine_weights)
    accumulate = torch.float64 if ye.dtype == torch.float64 else torch.float32
    if weights is not None and ye.dtype != accumulate:
        rows, offsets, weights = _split_weights(rows, offsets, weights, ye.dtype)
    elif weights is not None:
        weights = weights.to(accumulate)
    # embedding_bag "sum" is the token-major gather-reduce: one thread per token, entries in
    # order, multiply-add into a float32 register row (FBGEMM on CPU), one rounding at the end.
    return F.embedding_bag(rows, ye, offsets, mode="sum", per_sample_weights=weights)


def _split_weights(
    rows: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact float32 weights for a low-precision ``embedding_bag``.

    ``embedding_bag`` wants weights in the dtype of the table, but accumulates bfloat16 and float16
    in float32. A float32 weight is the exact sum of three bfloat16 parts (8 + 8 + 8 significant
    bits), so each entry is repeated three times with its parts as weights: the repeats hit L1,
    memory traffic is unchanged, and the sum is the float32 one up to float32 rounding.
    """
    weights = weights.float()
    parts = []
    for _ in range(_WEIGHT_PARTS):
        part = weights.to(dtype)
        parts.append(part)
        weights = weights - part.float()
    split = torch.stack(parts, dim=1).reshape(-1)
    return rows.repeat_interleave(_WEIGHT_PARTS), offsets * _WEIGHT_PARTS, split


def combine_backward(
    grad_y: torch.Tensor,
    ye: torch.Tensor,
    combine_rows: torch.Tensor,
    combine_weights: torch.Tensor,
    source_tokens: torch.Tensor,
    num_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of combine: ``grad_ye[i] = w_i * grad_y[source_tokens[i]]`` (a gather) and
    ``grad_w[t, f] = <grad_y[t], ye[rows[t, f]]>``, both zero where nothing was read."""
    num_rows, width = ye.shape
    valid = int(num_valid)
    accumulate = torch.float64 if ye.dtype == torch.float64 else torch.float32
    flat_rows = combine_rows.reshape(-1)
    present = flat_rows >= 0
    # Each dispatch row is read by exactly one (token, slot): a collision-free placement.
    row_weight = torch.zeros(num_rows, dtype=accumulate, device=ye.device)
    row_weight.index_copy_(
        0, flat_rows[present].to(torch.int64), combine_weights.reshape(-1)[present].to(accumulate)
    )
    gathered = grad_y.index_select(0, source_tokens[:valid]).to(accumulate)
    row_dot = torch.zeros(num_rows, dtype=accumulate, device=ye.device)
    row_dot[:valid] = torch.einsum("rd,rd->r", gathered, ye[:valid].to(accumulate))
    grad_ye = torch.zeros((num_rows, width), dtype=ye.dtype, device=ye.device)
    grad_ye[:valid] = gathered.mul_(row_weight[:valid, None])
    grad_weights = torch.where(
        combine_rows >= 0, row_dot[combine_rows.clamp(min=0).to(torch.int64)], 0.0
    ).to(combine_weights.dtype)
    return grad_ye, grad_weights
