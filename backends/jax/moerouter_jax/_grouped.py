"""Grouped matrix product over expert-grouped rows: only the ``sum(group_sizes)`` valid rows.

Two implementations of one contract, ``out[rows of e] = x[rows of e] @ weight[e]`` with rows past
the groups left zero:

- ``"ragged_dot"``: :func:`jax.lax.ragged_dot`, JAX's portable grouped GEMM (GPU, TPU); under
  ``vmap`` with per-example group sizes (which jax 0.10.2 cannot batch) a map over the examples.
- ``"tiled"``: a loop over row tiles, each inside one expert's group, whose trip count is the number
  of tiles the *valid* rows need (a ``while_loop`` with a data-dependent bound), with a
  ``jax.custom_vjp`` backward made of the same loops. Rows of null experts and dropped
  assignments are never multiplied.

``"auto"`` picks ``"tiled"`` on CPU and ``"ragged_dot"`` elsewhere: XLA:CPU (jax 0.10.2) expands
``ragged_dot`` into one dense product of an ``(R, E*k)`` masked copy of ``x`` with all experts'
weights, ``E`` times the FLOPs of the valid rows whatever the group sizes (measured: 17x a single
dense ``(R, k) @ (k, n)`` at R=4096, k=512, n=256, E=16, and no faster with a quarter of the rows
valid). Whether XLA's GPU lowering is dense too could not be checked (no GPU in this session);
reference/performance.md §2.7 cites a dense fallback on B200 (marin issue #7012).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moerouter_jax._kernels import platforms

__all__ = ["grouped_matmul"]

Array = Any
Implementation = Literal["auto", "ragged_dot", "tiled"]

_ZERO = np.int32(0)  # an int32 slice index, also in float64 mode (a bare 0 becomes int64)

#: Rows per tile of the "tiled" implementation: each tile wastes at most this many rows per expert.
TILE_ROWS = 64


def grouped_matmul(
    x: Array,
    weight: Array,
    group_sizes: Array,
    *,
    implementation: Implementation = "auto",
    tile_rows: int = TILE_ROWS,
) -> Array:
    """``out[rows of e] = x[rows of e] @ weight[e]`` for expert-grouped rows; zero past the groups.

    Parameters
    ----------
    x : jax.Array (R, k)
        Rows grouped by expert (expert 0's first), as :func:`moerouter.dispatch` returns them.
    weight : jax.Array (E, k, n)
        One matrix per expert.
    group_sizes : jax.Array (E,) int32
        Rows per expert (:attr:`moerouter.Plan.group_sizes`); ``sum(group_sizes) <= R``.
    implementation : {"auto", "ragged_dot", "tiled"}
        See the module docstring; ``"auto"`` is ``"tiled"`` on CPU, ``"ragged_dot"`` elsewhere.
    tile_rows : int
        Rows per tile of ``"tiled"``.

    Returns
    -------
    jax.Array (R, n)
        dtype of ``x``; products accumulate in float32 (float64 for float64 inputs).
        Differentiable in ``x`` and ``weight``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from moerouter_jax import grouped_matmul
    >>> x = jnp.ones((4, 2))
    >>> weight = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    >>> grouped_matmul(x, weight, jnp.asarray([1, 2], jnp.int32))[:, 0]
    Array([1., 2., 2., 0.], dtype=float32)
    """
    if implementation not in ("auto", "ragged_dot", "tiled"):
        raise ValueError(
            f"implementation must be 'auto', 'ragged_dot' or 'tiled', got {implementation!r}"
        )
    if x.ndim != 2 or weight.ndim != 3 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"x must be (R, k) and weight (E, k, n); got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if group_sizes.shape != (weight.shape[0],):
        raise ValueError(
            f"group_sizes must have shape ({weight.shape[0]},), got {tuple(group_sizes.shape)}"
        )
    if not isinstance(tile_rows, int) or tile_rows < 1:
        raise ValueError(f"tile_rows must be a positive int, got {tile_rows!r}")
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
    if implementation == "auto":
        implementation = "tiled" if platforms(x) == {"cpu"} else "ragged_dot"
    if implementation == "ragged_dot":
        return _ragged(x, weight, group_sizes)
    return _tiled(x, weight, group_sizes, tile_rows)


def _map_over_batch(function: Any) -> Any:
    """``function`` whose ``vmap`` is a ``lax.map`` over the batched arguments only.

    jax 0.10.2 cannot batch ``ragged_dot`` with per-example group sizes ("vmap over any dim but
    0 - NYI"); unbatched arguments (the expert weights) are closed over, not broadcast.
    """
    mapped = jax.custom_batching.custom_vmap(function)

    @mapped.def_vmap  # type: ignore[misc]
    def rule(axis_size: int, in_batched: list[Any], *args: Any) -> tuple[Any, Any]:
        batched = [index for index, flag in enumerate(in_batched) if flag]

        def one(sliced: list[Any]) -> Any:
            full = list(args)
            for index, value in zip(batched, sliced, strict=True):
                full[index] = value
            return mapped(*full)

        out = lax.map(one, [args[index] for index in batched])
        return out, jax.tree.map(lambda _: True, out)

    return mapped


def _plain_ragged(x: Array, weight: Array, group_sizes: Array) -> Array:
    out = lax.ragged_dot(x, weight, group_sizes, preferred_element_type=_accumulate_dtype(x.dtype))
    return out.astype(x.dtype)


@_map_over_batch
def _ragged_forward(x: Array, weight: Array, group_sizes: Array) -> Array:
    return _plain_ragged(x, weight, group_sizes)


@_map_over_batch
def _ragged_backward(x: Array, weight: Array, group_sizes: Array, grad: Array) -> Any:
    _, pullback = jax.vjp(lambda x, weight: _plain_ragged(x, weight, group_sizes), x, weight)
    return pullback(grad)


@jax.custom_vjp
def _ragged(x: Array, weight: Array, group_sizes: Array) -> Array:
    return _ragged_forward(x, weight, group_sizes)


def _ragged_fwd(x: Array, weight: Array, group_sizes: Array) -> tuple[Array, tuple[Array, ...]]:
    return _ragged_forward(x, weight, group_sizes), (x, weight, group_sizes)


def _ragged_bwd(residuals: tuple[Array, ...], grad: Array) -> tuple[Any, ...]:
    x, weight, group_sizes = residuals
    grad_x, grad_weight = _ragged_backward(x, weight, group_sizes, grad)
    return grad_x, grad_weight, None


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


def _accumulate_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _tile_table(group_sizes: Array, num_rows: int, tile_rows: int) -> tuple[Array, ...]:
    """For every tile: its expert, first row and the end of its expert's group; and how many
    tiles the valid rows need (the loops' trip count). The table has a static upper bound of
    ``ceil(R / tile_rows) + E`` entries."""
    num_experts = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tiles_per_expert = (group_sizes + tile_rows - 1) // tile_rows
    tile_ends = jnp.cumsum(tiles_per_expert)
    capacity = -(-num_rows // tile_rows) + num_experts
    tile = jnp.arange(capacity, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(tile_ends, tile, side="right"), num_experts - 1)
    first_tile = tile_ends[expert] - tiles_per_expert[expert]
    row = starts[expert] + (tile - first_tile) * tile_rows
    int32 = jnp.int32  # one index dtype, whether or not float64 mode is on
    return (
        expert.astype(int32),
        row.astype(int32),
        ends[expert].astype(int32),
        tile_ends[-1].astype(int32),
    )


def _tile_rows_mask(start: Array, end: Array, tile_rows: int) -> Array:
    return (start + jnp.arange(tile_rows) < end)[:, None]


def _tiled_forward(x: Array, weight: Array, group_sizes: Array, tile_rows: int) -> Array:
    num_rows, width = x.shape
    out_width = weight.shape[2]
    accumulate = _accumulate_dtype(x.dtype)
    expert, start, end, num_tiles = _tile_table(group_sizes, num_rows, tile_rows)
    # tile_rows spare rows at the end: a tile starting near R is never shifted by the clamping
    # of dynamic_slice.
    padded = jnp.concatenate([x, jnp.zeros((tile_rows, width), x.dtype)])

    def body(i: Array, out: Array) -> Array:
        rows = lax.dynamic_slice(padded, (start[i], _ZERO), (tile_rows, width))
        product = jnp.dot(rows, weight[expert[i]], preferred_element_type=accumulate)
        current = lax.dynamic_slice(out, (start[i], _ZERO), (tile_rows, out_width))
        keep = _tile_rows_mask(start[i], end[i], tile_rows)
        update = jnp.where(keep, product.astype(out.dtype), current)
        return lax.dynamic_update_slice(out, update, (start[i], _ZERO))

    out = jnp.zeros((num_rows + tile_rows, out_width), x.dtype)
    return lax.fori_loop(0, num_tiles, body, out)[:num_rows]


def _tiled_weight_grad(x: Array, grad: Array, group_sizes: Array, tile_rows: int) -> Array:
    """``out[e] = x[rows of e].T @ grad[rows of e]``, tile by tile in row order."""
    num_rows, width = x.shape
    out_width = grad.shape[1]
    num_experts = group_sizes.shape[0]
    accumulate = _accumulate_dtype(x.dtype)
    expert, start, end, num_tiles = _tile_table(group_sizes, num_rows, tile_rows)
    padded_x = jnp.concatenate([x, jnp.zeros((tile_rows, width), x.dtype)])
    padded_grad = jnp.concatenate([grad, jnp.zeros((tile_rows, out_width), grad.dtype)])

    def body(i: Array, total: Array) -> Array:
        keep = _tile_rows_mask(start[i], end[i], tile_rows)
        rows = lax.dynamic_slice(padded_x, (start[i], _ZERO), (tile_rows, width))
        rows = jnp.where(keep, rows, 0)
        grads = lax.dynamic_slice(padded_grad, (start[i], _ZERO), (tile_rows, out_width))
        product = jnp.dot(rows.T, grads, preferred_element_type=accumulate)
        index = (expert[i], _ZERO, _ZERO)
        current = lax.dynamic_slice(total, index, (1, width, out_width))
        return lax.dynamic_update_slice(total, current + product[None], index)

    total = jnp.zeros((num_experts, width, out_width), accumulate)
    return lax.fori_loop(0, num_tiles, body, total)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x: Array, weight: Array, group_sizes: Array, tile_rows: int) -> Array:
    return _tiled_forward(x, weight, group_sizes, tile_rows)


def _tiled_fwd(
    x: Array, weight: Array, group_sizes: Array, tile_rows: int
) -> tuple[Array, tuple[Array, ...]]:
    return _tiled_forward(x, weight, group_sizes, tile_rows), (x, weight, group_sizes)


def _tiled_bwd(tile_rows: int, residuals: tuple[Array, ...], grad: Array) -> tuple[Any, ...]:
    x, weight, group_sizes = residuals
    grad_x = _tiled_forward(grad, jnp.swapaxes(weight, 1, 2), group_sizes, tile_rows)
    grad_weight = _tiled_weight_grad(x, grad, group_sizes, tile_rows).astype(weight.dtype)
    return grad_x.astype(x.dtype), grad_weight, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
