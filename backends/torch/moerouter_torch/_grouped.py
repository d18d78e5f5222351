"""Grouped matrix product over expert-grouped rows: only the ``sum(group_sizes)`` valid rows.

``torch._grouped_mm`` where the GPU supports it (bfloat16, compute capability >= 9.0) and its
kernel set :data:`GROUPED_MM` is on, a loop of one matmul per expert elsewhere. Rows past
``sum(group_sizes)`` (dropped assignments, null experts) are never multiplied: that is where null
experts save FLOPs. Both forms are ``torch.library`` custom ops with autograd, so a MoE layer
still traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Any

import torch

from moerouter import KernelSet, _registry

__all__ = ["GROUPED_MM", "grouped_mm"]

#: ``torch._grouped_mm`` as used here (offsets, rows past the groups zeroed): never run on a GPU
#: yet, so the per-expert loop runs until it has passed there.
GROUPED_MM = KernelSet(
    name="torch-grouped-mm",
    description="torch._grouped_mm for bfloat16 experts on compute capability >= 9.0 "
    "(a per-expert loop otherwise)",
    verified_on="",
)


def _expert_matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One expert's product; a function of its own so tests can count the rows it sees."""
    return rows @ weight


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    if not _registry.kernel_set_enabled(GROUPED_MM):
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    aligned = x.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0
    return aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)


@torch.library.custom_op("moerouter_torch::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ weight[e]`` for expert-grouped ``x``; zero past the groups.

    ``x`` (R, k), ``weight`` (E, k, n), ``group_sizes`` (E,) int32 -> (R, n).
    """
    num_rows = x.shape[0]
    if _use_grouped_mm(x, weight):
        ends = torch.cumsum(group_sizes, 0, dtype=torch.int32)
        out = torch._grouped_mm(x, weight, offs=ends)
        valid = torch.arange(num_rows, device=x.device) < ends[-1]
        return torch.where(valid[:, None], out, torch.zeros_like(out))
    out = x.new_zeros((num_rows, weight.shape[2]))
    start = 0
    for expert, size in enumerate(group_sizes.tolist()):
        if size:
            out[start : start + size] = _expert_matmul(x[start : start + size], weight[expert])
        start += size
    return out


@grouped_mm.register_fake
def _(x, weight, group_sizes):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], weight.shape[2]))


@torch.library.custom_op("moerouter_torch::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """``out[e] = x[rows of e].T @ grad[rows of e]``: (E, k, n); zero for empty experts."""
    out = x.new_zeros((group_sizes.shape[0], x.shape[1], grad.shape[1]))
    start = 0
    for expert, size in enumerate(group_sizes.tolist()):
        if size:
            rows = slice(start, start + size)
            out[expert] = _expert_matmul(x[rows].transpose(0, 1), grad[rows])
        start += size
    return out


@grouped_mm_weight_grad.register_fake
def _(x, grad, group_sizes):  # type: ignore[no-untyped-def]
    return x.new_empty((group_sizes.shape[0], x.shape[1], grad.shape[1]))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, group_sizes = inputs
    ctx.save_for_backward(x, weight, group_sizes)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, weight, group_sizes = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm(grad, weight.transpose(1, 2).contiguous(), group_sizes)
    if ctx.needs_input_grad[1]:
        grad_weight = grouped_mm_weight_grad(x, grad, group_sizes)
    return grad_x, grad_weight, None


grouped_mm.register_autograd(_backward, setup_context=_setup)
