"""The router slot for torch tensors: exact top-k without sorting every row, and a fused router.

:func:`top_k` returns exactly the agnostic ``argsort(-scores, stable=True)[..., :k]`` in
``O(T * E)``. A float32 or float16 CPU tensor goes to NumPy's partition of unique keys on the
tensor's own memory (:func:`moerouter._numpy_backend._unique_key_top_k`: exact, no tie check,
several times faster than ``torch.topk`` on a CPU). Otherwise ``torch.topk`` of ``k + 1``
entries, then the stable sort only for the rows whose ``k + 1`` best values are not strictly
decreasing (a tie at the chosen set or its boundary, ``-inf`` ties, NaN): the fallback reads how
many rows need it (a host sync), so it runs eagerly on CPU; on other devices and under
``torch.compile`` the stable sort runs (the reference), and CUDA tensors take the Triton router
when its kernel set is on.

:func:`router` is the ``router`` kernel. On CPU without a bias, :func:`_keyed_router` takes the
choice, the routable rows and (without a gradient) the chosen logits from the same keys, so only
the softmax over E, the weights' softmax over k and the Routing's own arrays remain as
multi-threaded torch passes. Otherwise it finds the routable rows in one pass
(``isfinite(amax(row))``), zeroes the others as the reference does, computes the scores once
and selects with :func:`top_k`. The weights (:func:`_weights`) are one ``torch.softmax`` over the
k chosen, whatever the batch holds, so a token's result never depends on the other tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from array_api_compat import array_namespace

from moerouter import _registry
from moerouter._agnostic.scores import softmax
from moerouter._numpy_backend import (
    _KEY_BOUND,
    _best_keys,
    _finite_best,
    _key_columns,
    _key_values,
    _unique_key_top_k,
)
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
    if scores.dtype in (torch.float32, torch.float16):
        # NumPy's partition of unique keys, on the tensor's own memory: several times faster
        # than torch.topk on a CPU, and exact without a tie check. No gradient flows through
        # the columns, and the NumPy view shares the tensor's memory (no copy).
        try:
            host = scores.detach().numpy()
        except (RuntimeError, TypeError):  # a tensor NumPy cannot view (a functorch wrapper)
            host = None
        if host is not None:
            keyed = _unique_key_top_k(host, k)
            if keyed is not None:
                return torch.from_numpy(keyed)
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


#: Below this many columns torch's CPU softmax kernel is several times slower than the four
#: passes of the agnostic softmax (measured, torch 2.13, one thread: 0.58 ms against 0.12 ms at
#: T = 4096, E = 8; at E = 16 and above the fused kernel is faster).
_SHORT_ROW = 16


def _scores(values: torch.Tensor, score: str) -> torch.Tensor:
    # One fused op each; torch.sigmoid's value and gradient are finite for every finite input.
    if score != "softmax":
        return torch.sigmoid(values)
    if values.shape[-1] < _SHORT_ROW and values.device.type == "cpu":
        return softmax(values, xp=array_namespace(values))  # the reference's own formula
    return torch.softmax(values, dim=-1)


def router(
    values: torch.Tensor,
    k: int,
    *,
    score: str,
    weights: str,
    num_real: int,
    bias: Any = None,
    eligible: Any = None,
) -> RouterResult | None:
    """The ``router`` slot for torch (see :mod:`moerouter.policies._router`)."""
    if values.numel() == 0 or torch.compiler.is_compiling():
        return None
    xp = array_namespace(values)
    if values.device.type == "cpu" and eligible is None:
        keyed = _keyed_router(values, k, score=score, weights=weights, num_real=num_real, bias=bias)
        if keyed is not None:
            return keyed
    finite_rows = torch.isfinite(torch.amax(values, dim=-1))
    if values.device.type != "cpu":
        triton = _triton_for(values, weights=weights, num_real=num_real, bias=bias)
        if eligible is not None:
            triton = None
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
    if eligible is not None:
        selection = eligible(selection)
    choice = top_k(selection, k)
    chosen = torch.gather(selection, -1, choice)
    chosen_logits = chosen if bias is None else torch.gather(values, -1, choice)
    # The choices are best first: every one is routed iff every row's last one is above -inf.
    all_routed = (
        all_finite and num_real == values.shape[-1] and bool((chosen[..., -1] > -torch.inf).all())
    )
    if all_routed:
        routed = torch.ones((), dtype=torch.bool).expand(choice.shape)  # no pass, no memory
    else:
        routed = chosen > -torch.inf
        if num_real < values.shape[-1]:
            routed &= choice < num_real
        if not all_finite:
            routed &= finite_rows[..., None]
            probs = torch.where(finite_rows[..., None], probs, 0.0)
    return RouterResult(
        choice=choice,
        routed=routed,
        weights=_weights(
            chosen_logits,
            routed,
            probs,
            choice,
            score=score,
            weights=weights,
            all_routed=all_routed,
        ),
        probs=probs,
        finite_rows=finite_rows,
        xp=xp,
        all_routed=all_routed,
    )


def _keyed_router(
    values: torch.Tensor, k: int, *, score: str, weights: str, num_real: int, bias: Any
) -> RouterResult | None:
    """The CPU router when every row is finite and there is no bias: one NumPy pass of unique
    keys on the tensor's memory (single-threaded) gives the choice, the routable rows and,
    without a gradient, the chosen logits; torch adds the scores and the weights. Few
    multi-threaded torch passes remain (each one waits for every thread on a busy CPU).

    None hands the call to the general path: a bias, a non-finite row, or keys that do not
    apply. Both paths give the same bits for a finite row (batch invariance).
    """
    num_columns = values.shape[-1]
    if bias is not None or k >= num_columns or values.dtype != torch.float32:
        return None
    try:
        host = values.detach().numpy()
    except (RuntimeError, TypeError):  # a tensor NumPy cannot view (a functorch wrapper)
        return None
    best = _best_keys(host, k)
    if best is None:
        return None
    kept, lowest = best
    finite = _finite_best(kept)
    if not finite.all():
        return None
    choice = torch.from_numpy(_key_columns(kept, lowest))
    if torch.is_grad_enabled() and values.requires_grad:
        chosen = torch.gather(values, -1, choice)
    else:
        # The same values (a -0.0 comes back as 0.0, which changes no weight), without a pass.
        chosen = torch.from_numpy(_key_values(kept, lowest))
    all_routed = num_real == num_columns and bool((kept[..., -1] > -_KEY_BOUND).all())
    if all_routed:
        routed = torch.ones((), dtype=torch.bool).expand(choice.shape)
    else:
        routed = chosen > -torch.inf
        if num_real < num_columns:
            routed &= choice < num_real
    probs = _scores(values, score)
    return RouterResult(
        choice=choice,
        routed=routed,
        weights=_weights(
            chosen, routed, probs, choice, score=score, weights=weights, all_routed=all_routed
        ),
        probs=probs,
        finite_rows=torch.from_numpy(finite),
        xp=array_namespace(values),
        all_routed=all_routed,
    )


def _weights(
    chosen_logits: torch.Tensor,
    routed: torch.Tensor,
    probs: torch.Tensor,
    choice: torch.Tensor,
    *,
    score: str,
    weights: str,
    all_routed: bool,
) -> torch.Tensor:
    """The weight rule on the k chosen columns: the reference's own formula
    (:func:`~moerouter.policies._router.chosen_weights`), so the weights are the reference's bits
    (a fused ``torch.softmax`` differs by an ulp). ``all_routed`` skips the masking passes
    (``routed=None``), which changes no bit; a row's weights never depend on other rows."""
    return chosen_weights(
        chosen_logits,
        None if all_routed else routed,
        probs,
        choice,
        score=score,
        weights=weights,
        xp=array_namespace(chosen_logits),
    )
