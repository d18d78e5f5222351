"""The kernels as ``torch.library`` custom ops: autograd, fake (meta) shapes, device choice.

Each op is opaque to ``torch.compile`` (its fake implementation gives static shapes, so a whole
MoE layer traces with ``fullgraph=True``) and differentiable: the backward of a gather is a
gather-reduce with the inverse map (``combine_rows``), never a scatter-add.
"""

from __future__ import annotations

from typing import Any

import torch

from moerouter import KernelSet, _registry
from moerouter_torch import _kernels

__all__ = ["TRITON", "combine", "dispatch", "gather_sum", "plan_indices"]

_LIB = "moerouter_torch"

#: The Triton kernels of dispatch, combine and their gradients for CUDA tensors. Until they pass
#: on a GPU, CUDA tensors take the plain PyTorch kernels of ``_kernels`` (the CPU path's code).
TRITON = KernelSet(
    name="torch-triton",
    description="Triton dispatch, combine and their gradients for CUDA tensors "
    "(plain PyTorch ops otherwise)",
    verified_on="",
)


def _triton_for(tensor: torch.Tensor) -> Any:
    """The Triton kernels module for a CUDA ``tensor`` while the set is on, else None."""
    if tensor.device.type != "cuda" or not _registry.kernel_set_enabled(TRITON):
        return None
    try:
        from moerouter_torch import _triton
    except ImportError:
        return None
    return _triton


@torch.library.custom_op(f"{_LIB}::plan_indices", mutates_args=())
def plan_indices(
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    fan_in: int,
    token_layout: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """group_sizes, order, inverse, source_tokens, num_valid, combine_rows, combine_slots."""
    return _kernels.plan_indices(
        token_ids, expert_ids, num_tokens, num_experts, fan_in, token_layout
    )


@plan_indices.register_fake
def _(token_ids, expert_ids, num_tokens, num_experts, fan_in, token_layout):  # type: ignore[no-untyped-def]
    num_rows = expert_ids.shape[0]

    def new(*shape: int) -> torch.Tensor:
        return expert_ids.new_empty(shape, dtype=torch.int32)

    return (
        new(num_experts),
        new(num_rows),
        new(num_rows),
        new(num_rows),
        new(),
        new(num_tokens, fan_in),
        new(num_tokens, fan_in),
    )


def _gather_reduce(
    rows: torch.Tensor, combine_rows: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """The gather-reduce of :func:`combine` (``weights=None``: unweighted, for
    :func:`gather_sum`) on the Triton kernel where it runs, else the eager one."""
    triton = _triton_for(rows)
    if triton is not None:
        return triton.combine(rows, combine_rows, weights)
    return _kernels.gather_reduce(rows, combine_rows, weights)


@torch.library.custom_op(f"{_LIB}::gather_sum", mutates_args=())
def gather_sum(rows: torch.Tensor, combine_rows: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_f rows[combine_rows[t, f]]`` over real entries: the gradient of dispatch."""
    return _gather_reduce(rows, combine_rows, None)


@gather_sum.register_fake
def _(rows, combine_rows):  # type: ignore[no-untyped-def]
    return rows.new_empty((combine_rows.shape[0], rows.shape[1]))


@torch.library.custom_op(f"{_LIB}::dispatch", mutates_args=())
def dispatch(
    x: torch.Tensor,
    source_tokens: torch.Tensor,
    num_valid: torch.Tensor,
    combine_rows: torch.Tensor,
) -> torch.Tensor:
    """Rows of ``x`` in dispatch order, zero past ``num_valid``.

    ``combine_rows`` is not read: it is the inverse map the backward needs.
    """
    triton = _triton_for(x)
    if triton is not None:
        return triton.dispatch(x, source_tokens, num_valid)
    return _kernels.dispatch(x, source_tokens, num_valid)


@dispatch.register_fake
def _(x, source_tokens, num_valid, combine_rows):  # type: ignore[no-untyped-def]
    return x.new_empty((source_tokens.shape[0], x.shape[1]))


def _dispatch_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[3])


def _dispatch_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (combine_rows,) = ctx.saved_tensors
    return gather_sum(grad.contiguous(), combine_rows), None, None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op(f"{_LIB}::combine", mutates_args=())
def combine(
    ye: torch.Tensor,
    combine_rows: torch.Tensor,
    combine_weights: torch.Tensor,
    source_tokens: torch.Tensor,
    num_valid: torch.Tensor,
) -> torch.Tensor:
    """Weighted gather-reduce to tokens, float32 accumulation in a fixed order.

    ``source_tokens`` and ``num_valid`` are not read: the backward needs them.
    """
    return _gather_reduce(ye, combine_rows, combine_weights)


@combine.register_fake
def _(ye, combine_rows, combine_weights, source_tokens, num_valid):  # type: ignore[no-untyped-def]
    return ye.new_empty((combine_rows.shape[0], ye.shape[1]))


@torch.library.custom_op(f"{_LIB}::combine_backward", mutates_args=())
def combine_backward(
    grad_y: torch.Tensor,
    ye: torch.Tensor,
    combine_rows: torch.Tensor,
    combine_weights: torch.Tensor,
    source_tokens: torch.Tensor,
    num_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine` with respect to ``ye`` and ``combine_weights``."""
    triton = _triton_for(ye)
    if triton is not None:
        return triton.combine_backward(
            grad_y, ye, combine_rows, combine_weights, source_tokens, num_valid
        )
    return _kernels.combine_backward(
        grad_y, ye, combine_rows, combine_weights, source_tokens, num_valid
    )


@combine_backward.register_fake
def _(grad_y, ye, combine_rows, combine_weights, source_tokens, num_valid):  # type: ignore[no-untyped-def]
    return torch.empty_like(ye), torch.empty_like(combine_weights)


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ye, combine_rows, combine_weights, source_tokens, num_valid = inputs
    ctx.save_for_backward(ye, combine_rows, combine_weights, source_tokens, num_valid)


def _combine_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    ye, combine_rows, combine_weights, source_tokens, num_valid = ctx.saved_tensors
    grad_ye, grad_weights = combine_backward(
        grad.contiguous(), ye, combine_rows, combine_weights, source_tokens, num_valid
    )
    return grad_ye, None, grad_weights, None, None


combine.register_autograd(_combine_backward, setup_context=_combine_setup)
