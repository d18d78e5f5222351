"""Pallas kernels for dispatch and combine: the GPU row movers of :mod:`moerouter_jax._kernels`.

Both are gathers over a grid of (output row, column block) programs; neither writes a row twice,
so there are no atomics and results are the same run to run:

- :func:`gather_rows` (dispatch, and the first half of combine's backward): program ``(i, j)``
  copies columns block ``j`` of ``x[source_tokens[i]]`` into output row ``i``, or zeros past
  ``num_valid``.
- :func:`gather_reduce` (combine, and dispatch's backward): program ``(t, j)`` sums
  ``w[t, f] * rows[combine_rows[t, f]]`` over the slots ``f`` in order in a float32 register
  block, then writes token row ``t`` once (the token-centric gather-reduce of
  TransformerEngine's ``_unpermute_kernel``).
- :func:`topk_router`: a fused softmax/sigmoid top-k, one program per token (the counterpart of
  ``moerouter_torch._triton``'s). :func:`router` puts it in the registry's ``router`` slot, so
  ``TopK`` and ``GShardTop2`` reach it on a GPU while the set is on; its weights take their
  gradient from the policies' own formula.

Tests run them with ``interpret=True`` on the CPU at tiny shapes. They have not run on a real
GPU in this repository yet (no GPU was available when they were written): the ``gpu``-marked
tests check them there (``tools/gpu-check``).

They are written for Pallas's Triton lowering (whole-array refs indexed per program, one-row
blocks), which they ask for explicitly: since JAX 0.10 a ``pallas_call`` on GPU lowers to Mosaic
GPU unless given Triton compiler parameters. JAX 0.11 deprecates the Triton lowering (a
``DeprecationWarning`` at compile time); a Mosaic GPU port is future work.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moerouter.policies._router import RouterResult, chosen_weights, scores_of

__all__ = ["gather_reduce", "gather_rows", "router", "topk_router"]

Array = Any

#: Widest column block one program moves (Triton wants powers of two).
MAX_BLOCK_COLUMNS = 1024

#: Set by tests: run every kernel in the Pallas interpreter (CPU).
INTERPRET = False


def _compiler_params(interpret: bool) -> Any:
    """Triton compiler parameters for a GPU ``pallas_call`` (None when interpreting)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    # Named TritonCompilerParams before JAX 0.7.
    params = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return params(num_warps=4, num_stages=1)


def _interpret(interpret: bool | None) -> bool:
    return INTERPRET if interpret is None else interpret


def _block_columns(width: int) -> int:
    """The largest power of two <= MAX_BLOCK_COLUMNS dividing ``width``."""
    block = 1
    while block * 2 <= MAX_BLOCK_COLUMNS and width % (block * 2) == 0:
        block *= 2
    return block


def _accumulate_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _gather_rows_kernel(
    source_ref: Any, valid_ref: Any, x_ref: Any, out_ref: Any, *, block: int
) -> None:
    row, column = pl.program_id(0), pl.program_id(1)
    valid = row < valid_ref[0]
    source = jnp.where(valid, source_ref[row], 0)
    values = x_ref[pl.ds(source, 1), pl.ds(column * block, block)]
    out_ref[...] = jnp.where(valid, values, jnp.zeros_like(values))


def gather_rows(
    x: Array, source_tokens: Array, num_valid: Array, *, interpret: bool | None = None
) -> Array:
    """``out[i] = x[source_tokens[i]]`` for ``i < num_valid``, zero after."""
    num_rows, width = source_tokens.shape[0], x.shape[1]
    block = _block_columns(width)
    kernel = functools.partial(_gather_rows_kernel, block=block)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, width), x.dtype),
        grid=(num_rows, width // block),
        in_specs=[pl.no_block_spec] * 3,  # whole arrays, indexed by the kernel
        out_specs=pl.BlockSpec((1, block), lambda i, j: (i, j)),
        interpret=_interpret(interpret),
        compiler_params=_compiler_params(_interpret(interpret)),
    )(source_tokens.astype(jnp.int32), jnp.reshape(num_valid, (1,)).astype(jnp.int32), x)


def _gather_reduce_kernel(
    rows_ref: Any,
    weights_ref: Any,
    values_ref: Any,
    out_ref: Any,
    *,
    block: int,
    fan_in: int,
    weighted: bool,
    accumulate: Any,
) -> None:
    token, column = pl.program_id(0), pl.program_id(1)
    total = jnp.zeros((1, block), accumulate)
    for slot in range(fan_in):  # unrolled: a fixed order, the agnostic path's
        row = rows_ref[token, slot]
        present = row >= 0
        values = values_ref[pl.ds(jnp.maximum(row, 0), 1), pl.ds(column * block, block)]
        values = values.astype(accumulate)
        if weighted:
            values = weights_ref[token, slot].astype(accumulate) * values
        total = total + jnp.where(present, values, jnp.zeros_like(values))
    out_ref[...] = total.astype(out_ref.dtype)


def gather_reduce(
    values: Array,
    combine_rows: Array,
    weights: Array | None,
    *,
    interpret: bool | None = None,
) -> Array:
    """``y[t] = sum_f w[t, f] * values[combine_rows[t, f]]`` over slots ``>= 0``, slot order.

    Accumulates in float32 (float64 for float64 values); a plain sum without weights.
    """
    num_tokens, fan_in = combine_rows.shape
    width = values.shape[1]
    block = _block_columns(width)
    weighted = weights is not None
    kernel = functools.partial(
        _gather_reduce_kernel,
        block=block,
        fan_in=fan_in,
        weighted=weighted,
        accumulate=_accumulate_dtype(values.dtype),
    )
    weight_input = weights if weights is not None else jnp.zeros((1, 1), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_tokens, width), values.dtype),
        grid=(num_tokens, width // block),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((1, block), lambda t, j: (t, j)),
        interpret=_interpret(interpret),
        compiler_params=_compiler_params(_interpret(interpret)),
    )(combine_rows.astype(jnp.int32), weight_input, values)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _topk_router_kernel(
    logits_ref: Any,
    experts_ref: Any,
    weights_ref: Any,
    *,
    k: int,
    num_experts: int,
    sigmoid: bool,
    normalize: bool,
) -> None:
    logits = logits_ref[...].astype(jnp.float32)  # (1, E padded), padding is -inf
    width = logits.shape[1]
    column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    real = column < num_experts
    # A row whose maximum is not finite (NaN, +inf, all -inf) is routed nowhere: it is read as
    # zeros, as the policies' cleaning does, so its columns and weights are the reference's.
    finite_row = jnp.isfinite(jnp.max(logits))
    logits = jnp.where(finite_row | ~real, logits, 0.0)
    if sigmoid:
        # moerouter's stable sigmoid (moerouter._numerics.sigmoid): exp never overflows.
        small = jnp.exp(-jnp.abs(logits))
        scores = jnp.where(logits >= 0, 1.0 / (1.0 + small), small / (1.0 + small))
    else:
        shifted = jnp.exp(logits - jnp.max(logits))
        shifted = jnp.where(real, shifted, 0.0)
        scores = shifted / jnp.sum(shifted)
    # Rank the logits (monotone with either score): the largest first, ties to the lower column.
    # A taken column is never a candidate again, even once only -inf entries remain.
    taken = ~real
    chosen_columns, chosen_logits, chosen_scores = [], [], []
    for _ in range(k):
        best = jnp.max(jnp.where(taken, -jnp.inf, logits))
        pick = jnp.min(jnp.where((logits == best) & ~taken, column, width))
        hit = column == pick
        chosen_columns.append(pick)
        chosen_logits.append(jnp.sum(jnp.where(hit, logits, 0.0)))
        chosen_scores.append(jnp.sum(jnp.where(hit, scores, 0.0)))
        taken = taken | hit
    if normalize:
        # The policies' renormalisation: a softmax of the log-scores over the chosen columns
        # (log sigmoid for sigmoid scores), finite where every chosen score underflows.
        if sigmoid:
            chosen_logits = [
                jnp.minimum(value, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(value)))
                for value in chosen_logits
            ]
        top = chosen_logits[0]  # the best, finite in a finite row
        exps = [jnp.exp(value - top) for value in chosen_logits]
        total = sum(exps[1:], exps[0])
        weights = [value / total for value in exps]
    else:
        weights = chosen_scores
    slot = jax.lax.broadcasted_iota(jnp.int32, experts_ref.shape, 1)
    experts = jnp.zeros(experts_ref.shape, jnp.int32)
    out_weights = jnp.zeros(weights_ref.shape, jnp.float32)
    for j in range(k):
        experts = jnp.where(slot == j, chosen_columns[j], experts)
        out_weights = jnp.where(slot == j, weights[j], out_weights)
    experts_ref[...] = experts
    weights_ref[...] = out_weights


def topk_router(
    logits: Array,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    interpret: bool | None = None,
) -> tuple[Array, Array]:
    """Fused softmax/sigmoid top-k: (T, k) int32 experts and float32 weights, one program a token.

    Matches :class:`moerouter.TopK` (no capacity, ``softmax_after_topk=False``): same experts
    (ties to the lower column, slots in descending order, a column never twice, ``-inf`` after
    every finite logit), weights within float32 rounding (zero for a ``-inf`` choice). A row
    whose maximum is not finite (NaN, ``+inf``, all ``-inf``) is read as zeros, as the policies
    clean it; they route such a row nowhere, which the caller marks (:func:`router`).
    """
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    width = _next_power_of_two(num_experts)  # Triton blocks are powers of two
    slots = _next_power_of_two(k)
    padded = jnp.pad(
        logits.astype(jnp.float32), ((0, 0), (0, width - num_experts)), constant_values=-jnp.inf
    )
    kernel = functools.partial(
        _topk_router_kernel,
        k=k,
        num_experts=num_experts,
        sigmoid=score == "sigmoid",
        normalize=normalize,
    )
    experts, weights = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((num_tokens, slots), jnp.int32),
            jax.ShapeDtypeStruct((num_tokens, slots), jnp.float32),
        ),
        grid=(num_tokens,),
        in_specs=[pl.BlockSpec((1, width), lambda t: (t, 0))],
        out_specs=(
            pl.BlockSpec((1, slots), lambda t: (t, 0)),
            pl.BlockSpec((1, slots), lambda t: (t, 0)),
        ),
        interpret=_interpret(interpret),
        compiler_params=_compiler_params(_interpret(interpret)),
    )(padded)
    return experts[:, :k], weights[:, :k]


def router(values: Array, k: int, *, score: str, weights: str) -> RouterResult:
    """The registry's ``router`` slot through :func:`topk_router` (``weights`` ``"renormalize"``
    or ``"raw"``; every column a real expert, no selection bias).

    ``values`` are float32 ``(G, S, E)`` logits. Columns and routed flags equal the reference
    router's; weights and probabilities agree within float32 rounding. The kernel has no
    backward: the weights' gradient is the reference formula's at the kernel's choice.
    """
    xp = jnp
    finite_rows = jnp.isfinite(jnp.max(values, axis=-1))
    clean = jnp.where(finite_rows[..., None], values, 0.0)
    experts, fused = topk_router(
        jax.lax.stop_gradient(values.reshape(-1, values.shape[-1])),
        k,
        score=score,
        normalize=weights == "renormalize",
    )
    shape = (*values.shape[:-1], k)
    choice = experts.reshape(shape)
    routed = (jnp.take_along_axis(clean, choice, axis=-1) > -jnp.inf) & finite_rows[..., None]
    probs = scores_of(clean, score, xp=xp)

    def formula(logits: Array) -> Array:
        return chosen_weights(
            jnp.take_along_axis(logits, choice, axis=-1),
            routed,
            scores_of(logits, score, xp=xp),
            choice,
            score=score,
            weights=weights,
            xp=xp,
        )

    @jax.custom_vjp
    def fused_weights(logits: Array) -> Array:
        return fused.reshape(shape)

    def forward(logits: Array) -> tuple[Array, Array]:
        return fused.reshape(shape), logits

    def backward(logits: Array, cotangent: Array) -> tuple[Array]:
        return jax.vjp(formula, logits)[1](cotangent)

    fused_weights.defvjp(forward, backward)
    return RouterResult(
        choice=choice,
        routed=routed,
        weights=fused_weights(clean),
        probs=jnp.where(finite_rows[..., None], probs, 0.0),
        finite_rows=finite_rows,
        xp=xp,
    )
