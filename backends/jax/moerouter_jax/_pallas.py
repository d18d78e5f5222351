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

Tests run them with ``interpret=True`` on the CPU at tiny shapes. They have not run on a real
GPU in this repository yet (no GPU was available when they were written): the ``gpu``-marked
tests check them there.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["gather_reduce", "gather_rows"]

Array = Any

#: Widest column block one program moves (Triton wants powers of two).
MAX_BLOCK_COLUMNS = 1024

#: Set by tests: run every kernel in the Pallas interpreter (CPU).
INTERPRET = False


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
        interpret=INTERPRET if interpret is None else interpret,
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
        interpret=INTERPRET if interpret is None else interpret,
    )(combine_rows.astype(jnp.int32), weight_input, values)
