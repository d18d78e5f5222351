"""Triton kernels for CUDA tensors: dispatch, combine (and its backward), and a fused top-k router.

Every kernel is output-centric: each program owns one output row (or a block of it) and gathers
what it needs, so there are no atomics and results are bit-identical run to run. The tests run
them in the Triton interpreter (``TRITON_INTERPRET=1``, set before this module is imported) on
CPU tensors at tiny shapes, and on a real GPU when one is present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["combine", "combine_backward", "dispatch", "topk_router"]


def _block(width: int) -> int:
    return min(triton.next_power_of_2(width), 1024)


@triton.jit
def _dispatch_kernel(
    x_ptr, out_ptr, source_ptr, num_valid_ptr, width, x_stride, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = columns < width
    # Rows past num_valid read nothing (a scalar condition folded into the column bound).
    valid_width = width * (row < tl.load(num_valid_ptr)).to(tl.int32)
    token = tl.load(source_ptr + row).to(tl.int64)
    values = tl.load(x_ptr + token * x_stride + columns, mask=columns < valid_width, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * width + columns, values, mask=in_row)


def dispatch(x: torch.Tensor, source_tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """``out[i] = x[source_tokens[i]]`` for ``i < num_valid``, zero after; (R, d), dtype of x."""
    x = x if x.stride(1) == 1 else x.contiguous()
    num_rows, width = source_tokens.shape[0], x.shape[1]
    out = torch.empty((num_rows, width), dtype=x.dtype, device=x.device)
    block = _block(width)
    if num_rows and width:
        grid = (num_rows, triton.cdiv(width, block))
        _dispatch_kernel[grid](x, out, source_tokens, num_valid, width, x.stride(0), BLOCK=block)
    return out


@triton.jit
def _combine_kernel(
    ye_ptr,
    out_ptr,
    rows_ptr,
    weights_ptr,
    width,
    FAN_IN: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = columns < width
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in range(FAN_IN):
        row = tl.load(rows_ptr + token * FAN_IN + slot)
        # A missing entry (row -1) loads nothing and adds exactly zero, whatever ye holds.
        present_width = width * (row >= 0).to(tl.int32)
        values = tl.load(
            ye_ptr + row.to(tl.int64) * width + columns, mask=columns < present_width, other=0.0
        ).to(tl.float32)
        if HAS_WEIGHTS:
            values = values * tl.load(weights_ptr + token * FAN_IN + slot)
        total += values
    tl.store(
        out_ptr + token.to(tl.int64) * width + columns,
        total.to(out_ptr.dtype.element_ty),
        mask=in_row,
    )


def combine(
    ye: torch.Tensor, combine_rows: torch.Tensor, combine_weights: torch.Tensor | None
) -> torch.Tensor:
    """``y[t] = sum_f w[t, f] * ye[rows[t, f]]`` in slot order, float32 accumulation."""
    ye = ye.contiguous()
    num_tokens, fan_in = combine_rows.shape
    width = ye.shape[1]
    out = torch.empty((num_tokens, width), dtype=ye.dtype, device=ye.device)
    block = _block(width)
    weights = combine_rows if combine_weights is None else combine_weights.float().contiguous()
    if num_tokens and width:
        grid = (num_tokens, triton.cdiv(width, block))
        _combine_kernel[grid](
            ye,
            out,
            combine_rows.contiguous(),
            weights,
            width,
            FAN_IN=fan_in,
            HAS_WEIGHTS=combine_weights is not None,
            BLOCK=block,
        )
    return out


@triton.jit
def _combine_backward_kernel(
    grad_y_ptr,
    ye_ptr,
    source_ptr,
    row_weight_ptr,
    num_valid_ptr,
    grad_ye_ptr,
    row_dot_ptr,
    width,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    valid_width = width * (row < tl.load(num_valid_ptr)).to(tl.int32)
    token = tl.load(source_ptr + row).to(tl.int64)
    weight = tl.load(row_weight_ptr + row)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < width
        valid = columns < valid_width
        grad = tl.load(grad_y_ptr + token * width + columns, mask=valid, other=0.0)
        grad = grad.to(tl.float32)
        values = tl.load(ye_ptr + row.to(tl.int64) * width + columns, mask=valid, other=0.0)
        dot += grad * values.to(tl.float32)
        tl.store(
            grad_ye_ptr + row.to(tl.int64) * width + columns,
            (grad * weight).to(grad_ye_ptr.dtype.element_ty),
            mask=mask,
        )
    tl.store(row_dot_ptr + row, tl.sum(dot, axis=0))


def combine_backward(
    grad_y: torch.Tensor,
    ye: torch.Tensor,
    combine_rows: torch.Tensor,
    combine_weights: torch.Tensor,
    source_tokens: torch.Tensor,
    num_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of combine: ``grad_ye[i] = w_i * grad_y[source[i]]``, ``grad_w = <grad_y, ye>``."""
    grad_y, ye = grad_y.contiguous(), ye.contiguous()
    num_rows, width = ye.shape
    flat_rows = combine_rows.reshape(-1)
    present = flat_rows >= 0
    # Each dispatch row is read by exactly one (token, slot): a collision-free placement.
    row_weight = torch.zeros(num_rows, dtype=torch.float32, device=ye.device)
    row_weight.index_copy_(
        0, flat_rows[present].long(), combine_weights.reshape(-1)[present].float()
    )
    grad_ye = torch.empty_like(ye)
    row_dot = torch.empty(num_rows, dtype=torch.float32, device=ye.device)
    if num_rows:
        _combine_backward_kernel[(num_rows,)](
            grad_y,
            ye,
            source_tokens,
            row_weight,
            num_valid,
            grad_ye,
            row_dot,
            width,
            BLOCK=_block(width),
        )
    grad_weights = torch.where(present, row_dot[flat_rows.clamp(min=0).long()], 0.0)
    return grad_ye, grad_weights.reshape(combine_rows.shape).to(combine_weights.dtype)


@triton.jit
def _topk_router_kernel(
    logits_ptr,
    experts_ptr,
    weights_ptr,
    num_experts,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_E)
    in_row = columns < num_experts
    logits = tl.load(
        logits_ptr + token * num_experts + columns, mask=in_row, other=-float("inf")
    ).to(tl.float32)
    row_max = tl.max(logits, axis=0)
    if SIGMOID:
        # moerouter's stable sigmoid (moerouter._numerics.sigmoid): exp never overflows.
        small = tl.exp(-tl.abs(logits))
        scores = tl.where(logits >= 0, 1.0 / (1.0 + small), small / (1.0 + small))
    else:
        exp = tl.where(in_row, tl.exp(logits - row_max), 0.0)
        scores = exp / tl.sum(exp, axis=0)
    # k rounds of argmax on the logits (monotone with the scores inside a row): ties go to the
    # lower expert, slots come out in descending order, as in moerouter.TopK.
    # The k picks stay in registers and are stored once: reading back stores of this program
    # from global memory would race between its threads on a GPU (no barrier orders them).
    slots = tl.arange(0, K_PAD)
    kept_experts = tl.zeros([K_PAD], dtype=tl.int32)
    kept_weights = tl.zeros([K_PAD], dtype=tl.float32)
    remaining = logits
    picked_total = 0.0
    for slot in tl.static_range(K):
        best = tl.max(remaining, axis=0)
        expert = tl.min(tl.where(remaining == best, columns, BLOCK_E), axis=0)
        chosen = columns == expert
        if SIGMOID or not NORMALIZE:
            weight = tl.sum(tl.where(chosen, scores, 0.0), axis=0)
        else:
            # Renormalised softmax weights are the softmax of the k chosen logits.
            weight = tl.exp(best - row_max)
        picked_total += weight
        kept_experts = tl.where(slots == slot, expert.to(tl.int32), kept_experts)
        kept_weights = tl.where(slots == slot, weight, kept_weights)
        remaining = tl.where(chosen, -float("inf"), remaining)
    if NORMALIZE:
        kept_weights = kept_weights / picked_total
    tl.store(experts_ptr + token * K + slots, kept_experts, mask=slots < K)
    tl.store(weights_ptr + token * K + slots, kept_weights, mask=slots < K)


def topk_router(
    logits: torch.Tensor, k: int, *, score: str = "softmax", normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax/sigmoid top-k with renormalisation: (T, k) int32 experts, float32 weights.

    One program per token reads its logits row once. Matches :class:`moerouter.TopK`'s
    ``expert_ids`` and ``weights`` on rows of finite logits.
    """
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    experts = torch.empty((num_tokens, k), dtype=torch.int32, device=logits.device)
    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=logits.device)
    if num_tokens:
        _topk_router_kernel[(num_tokens,)](
            logits,
            experts,
            weights,
            num_experts,
            K=k,
            K_PAD=triton.next_power_of_2(k),
            SIGMOID=score == "sigmoid",
            NORMALIZE=normalize,
            BLOCK_E=triton.next_power_of_2(num_experts),
        )
    return experts, weights
