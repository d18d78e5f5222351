"""The router slot for torch tensors: exact top-k without sorting every row, and a fused router.

:func:`top_k` returns exactly the agnostic ``argsort(-scores, stable=True)[..., :k]`` in
``O(T * E)``: ``torch.topk`` of ``k + 1`` entries, then the stable sort only for the rows whose
``k + 1`` best values are not strictly decreasing (a tie that touches the chosen set or its
boundary, ``-inf`` ties, NaN). ``torch.topk`` does not promise an order among equal values; with
strictly decreasing values there is only one answer. The fallback reads how many rows need it
(a host sync), so it runs eagerly on CPU; on other devices and under ``torch.compile`` the
stable sort runs (the reference), and CUDA tensors take the Triton router when its kernel set is
on.

:func:`router` is the ``router`` kernel on CPU: it finds the routable rows in one pass
(``isfinite(amax(row))``), zeroes the others as the reference does, computes the scores once
with ``torch.softmax`` / ``torch.sigmoid`` and selects with :func:`top_k`; the weights use the
reference's own helpers on the k chosen columns, whatever the batch holds, so a token's result
never depends on the other tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from array_api_compat import array_namespace

from moerouter import _registry
from moerouter.policies._router import RouterResult, biased_selection, chosen_weights
from moerouter_torch._ops import TRITON


def _exact(scores: torch.Tensor) -> bool:
    return scores.device.type == "cpu" and not torch.compiler.is_compiling()


def _reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(-scores, dim=-1, stable=True)[..., :k]


def top_k(scores: torch.Tensor, k: int, *, nan_free: bool = False) -> torch.Tensor:
    """The ``k`` best columns of each row, best first, ties to the lower column (int64).

    ``nan_free`` is not needed here: a NaN fails the strictly-decreasing check and its row
    takes the stable sort.
    """
    num_columns = scores.shape[-1]
    if not _exact(scores) or k >= num_columns or scores.numel() == 0:
        return _reference(scores, k)
    values, columns = torch.topk(scores, k + 1, dim=-1, sorted=True)
    # Exact iff the k + 1 best are strictly decreasing (False for NaN and for equal values).
    distinct = (values[..., :-1] > values[..., 1:]).all(dim=-1)
    # Contiguous either way: the layout must not depend on whether some row had a tie.
    columns = columns[..., :k].contiguous()
    if not bool(distinct.all()):
        rows = (~distinct).reshape(-1).nonzero().squeeze(1)
        flat = columns.reshape(-1, k).clone()
        flat[rows] = _reference(scores.reshape(-1, num_columns)[rows], k)
        columns = flat.reshape(columns.shape)
    return columns


def _triton_for(values: torch.Tensor, *, weights: str, num_real: int, bias: Any) -> Any:
    """The Triton module when its fused router computes this call, else None (no sync here)."""
    if (
        values.device.type != "cuda"
        or not _registry.kernel_set_enabled(TRITON)
        or bias is not None
        or num_real != values.shape[-1]
        or weights == "softmax_after_topk"
        or values.requires_grad  # the kernel has no backward
    ):
        return None
    try:
        from moerouter_torch import _triton
    except ImportError:
        return None
    return _triton


def _scores(values: torch.Tensor, score: str) -> torch.Tensor:
    # One fused op each; torch.sigmoid's value and gradient are finite for every finite input.
    return torch.softmax(values, dim=-1) if score == "softmax" else torch.sigmoid(values)


def router(
    values: torch.Tensor,
    k: int,
    *,
    score: str,
    weights: str,
    num_real: int,
    bias: Any = None,
) -> RouterResult | None:
    """The ``router`` slot for torch (see :mod:`moerouter.policies._router`)."""
    if values.numel() == 0 or torch.compiler.is_compiling():
        return None
    xp = array_namespace(values)
    finite_rows = torch.isfinite(torch.amax(values, dim=-1))
    if values.device.type != "cpu":
        triton = _triton_for(values, weights=weights, num_real=num_real, bias=bias)
        # The fused kernel assumes finite logits (no -inf masks, no bad rows): one sync checks.
        if triton is None or not bool(torch.isfinite(values).all()):
            return None
        rows = values.reshape(-1, values.shape[-1])
        experts, fused_weights = triton.topk_router(
            rows, k, score=score, normalize=weights == "renormalize"
        )
        shape = (*values.shape[:-1], k)
        choice = experts.to(torch.int64).reshape(shape)
        return RouterResult(
            choice,
            choice < num_real,
            fused_weights.reshape(shape),
            _scores(values, score),
            finite_rows,
            xp,
        )
    all_finite = bool(finite_rows.all())
    if not all_finite:
        # Clean the bad rows here, as the reference does (zero logits, so no NaN reaches a
        # gradient), rather than hand the batch to the reference: its softmax rounds
        # differently, and a token's result must not depend on another token's row.
        values = torch.where(finite_rows[..., None], values, 0.0)
    probs = _scores(values, score)
    selection = values if bias is None else biased_selection(values, probs, bias, xp=xp)
    choice = top_k(selection, k)
    chosen = torch.take_along_dim(selection, choice, dim=-1)
    chosen_logits = chosen if bias is None else torch.take_along_dim(values, choice, dim=-1)
    routed = chosen > -torch.inf
    if num_real < values.shape[-1]:
        routed &= choice < num_real
    if not all_finite:
        routed &= finite_rows[..., None]
        probs = torch.where(finite_rows[..., None], probs, 0.0)
    # The reference's weight formula for every batch: a shortcut taken only when no row is
    # masked would make a token's rounding depend on the other tokens (batch invariance).
    routed_weights = chosen_weights(
        chosen_logits, routed, probs, choice, score=score, weights=weights, xp=xp
    )
    return RouterResult(
        choice=choice,
        routed=routed,
        weights=routed_weights,
        probs=probs,
        finite_rows=finite_rows,
        xp=xp,
    )
