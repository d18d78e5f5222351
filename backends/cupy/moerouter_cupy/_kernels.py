"""CUDA kernels for CuPy, loaded from ``kernels/*.cu`` with ``cupy.RawModule``.

CuPy is imported lazily, inside the functions: ``import moerouter_cupy`` works on a machine
without CuPy or a GPU (the registry and the compile tests need that).

Every function accepts CuPy arrays, and any other CUDA array that speaks DLPack (a torch tensor,
a JAX array): those are viewed as CuPy arrays without a copy, and the result goes back to the
caller's library through DLPack, also without a copy. bfloat16, which CuPy has no dtype for,
travels as 16-bit integers and is re-labelled on the way back.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from moerouter.routing import Plan, Routing

__all__ = ["NAME_EXPRESSIONS", "combine", "dispatch", "make_plan", "router", "topk_router"]

KERNEL_DIR = Path(__file__).parent / "kernels"
#: The same macros go to nvcc in the compile test. CuPy bundles its own cuda_fp16.h while
#: cuda_bf16.h comes from the local CUDA toolkit; without the implicit conversions between the two
#: types their versions need not match (cupy/cupy#8146). The kernels convert explicitly.
NO_IMPLICIT_CONVERSIONS = ("-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__")
COMPILE_OPTIONS = ("--std=c++17", f"--include-path={KERNEL_DIR}", *NO_IMPLICIT_CONVERSIONS)

#: Experts per lane the router is instantiated for: num_experts <= 32 * per_lane.
ROUTER_PER_LANE = (1, 2, 4, 8, 16)
#: The router keeps slot j in lane j.
ROUTER_MAX_K = 32
_CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_VECTOR = {"float32": 4, "float16": 8, "bfloat16": 8}  # elements per 16 bytes
_WORDS = {16: "uint4", 4: "unsigned int", 2: "unsigned short"}
#: Variable fan-in above this goes through the CSR combine kernel.
_PADDED_FAN_IN_LIMIT = 16
_CHUNK = 1024  # assignments per block in the counting sort (kChunk in plan.cu)

#: Every kernel each .cu file exposes, as NVRTC name expressions.
NAME_EXPRESSIONS: dict[str, list[str]] = {
    "router": [
        f"moerouter::topk_router<{cuda_type}, {per_lane}>"
        for cuda_type in _CUDA_TYPES.values()
        for per_lane in ROUTER_PER_LANE
    ],
    "plan": [
        f"moerouter::{name}"
        for name in (
            "expert_sort_keys",
            "count_keys",
            "scan_offsets",
            "scatter_keys",
            "finish_plan",
            "fill_token_major",
        )
    ],
    "dispatch": [f"moerouter::dispatch_rows<{word}>" for word in _WORDS.values()],
    "combine": [
        f"moerouter::{name}<{_CUDA_TYPES[dtype]}, {vector}>"
        for name in ("combine_padded", "combine_csr")
        for dtype in _CUDA_TYPES
        for vector in (_VECTOR[dtype], 1)
    ],
}


def _cupy() -> Any:
    import cupy

    return cupy


@functools.cache
def _module(name: str) -> Any:
    cupy = _cupy()
    return cupy.RawModule(
        code=(KERNEL_DIR / f"{name}.cu").read_text(),
        options=COMPILE_OPTIONS,
        name_expressions=NAME_EXPRESSIONS[name],
    )


def _kernel(module: str, expression: str) -> Any:
    return _module(module).get_function(expression)


def _i32(value: int) -> np.int32:
    return np.int32(value)


# ---------------------------------------------------------------------------------------------
# DLPack interoperability


def _library(array: Any) -> str:
    return type(array).__module__.partition(".")[0]


def _is_bfloat16(array: Any) -> bool:
    return "bfloat16" in str(getattr(array, "dtype", ""))


def to_cupy(array: Any) -> tuple[Any, str]:
    """A CuPy view of any CUDA array, and its dtype name (``"bfloat16"`` for bfloat16)."""
    cupy = _cupy()
    if isinstance(array, cupy.ndarray):
        return array, array.dtype.name
    if _is_bfloat16(array):
        library = _library(array)
        if library == "torch":
            import torch

            array = array.view(torch.int16)
        elif library in ("jax", "jaxlib"):
            import jax

            array = jax.lax.bitcast_convert_type(array, jax.numpy.uint16)
        else:
            raise TypeError(f"cannot pass bfloat16 arrays of {library} to the CuPy kernels")
        return cupy.from_dlpack(array), "bfloat16"
    converted = cupy.from_dlpack(array)
    return converted, converted.dtype.name


def from_cupy(result: Any, like: Any, dtype_name: str) -> Any:
    """``result`` as an array of ``like``'s library (no copy through DLPack)."""
    library = _library(like)
    if library == "cupy":
        return result
    if library == "torch":
        import torch

        tensor = torch.from_dlpack(result)
        return tensor.view(torch.bfloat16) if dtype_name == "bfloat16" else tensor
    if library in ("jax", "jaxlib"):
        import jax
        import jax.dlpack

        array = jax.dlpack.from_dlpack(result)
        if dtype_name == "bfloat16":
            array = jax.lax.bitcast_convert_type(array, jax.numpy.bfloat16)
        return array
    return result


def _int32(array: Any) -> Any:
    cupy = _cupy()
    converted = array if isinstance(array, cupy.ndarray) else to_cupy(array)[0]
    return cupy.ascontiguousarray(converted, dtype=cupy.int32)


def _float32(array: Any) -> Any:
    cupy = _cupy()
    converted = array if isinstance(array, cupy.ndarray) else to_cupy(array)[0]
    return cupy.ascontiguousarray(converted, dtype=cupy.float32)


# ---------------------------------------------------------------------------------------------
# router


def topk_router(
    logits: Any,
    *,
    k: int,
    score: str = "softmax",
    normalize: bool = True,
    softmax_after_topk: bool = False,
) -> Routing:
    """Fused :class:`moerouter.TopK` (no capacity) on the GPU: one kernel, one warp per token.

    ``logits`` is a (T, E) or (G, S, E) CUDA array of float32, float16 or bfloat16 (float64 is
    read as float32), with ``E <= 512`` and ``k <= min(E, 32)``. Returns a token-layout
    :class:`moerouter.Routing` of CuPy arrays, equal to ``TopK(num_experts=E, k=k, ...)``'s:
    integer fields identical, probabilities and weights within float32 rounding (``expf``).
    """
    cupy = _cupy()
    values, dtype_name = to_cupy(logits)
    if values.ndim not in (2, 3):
        raise ValueError(f"logits must have 2 or 3 dimensions, got shape {values.shape}")
    num_groups = values.shape[0] if values.ndim == 3 else 1
    num_experts = int(values.shape[-1])
    values = values.reshape(-1, num_experts)
    if dtype_name not in _CUDA_TYPES:
        values, dtype_name = values.astype(cupy.float32), "float32"
    values = cupy.ascontiguousarray(values)
    per_lane = next((p for p in ROUTER_PER_LANE if 32 * p >= num_experts), None)
    if per_lane is None:
        raise ValueError(f"the fused router handles up to 512 experts, got {num_experts}")
    if not 1 <= k <= min(num_experts, ROUTER_MAX_K):
        raise ValueError(f"k must be in [1, {min(num_experts, ROUTER_MAX_K)}], got {k}")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    num_tokens = int(values.shape[0])
    probs = cupy.empty((num_tokens, num_experts), dtype=cupy.float32)
    expert_ids = cupy.empty(num_tokens * k, dtype=cupy.int32)
    weights = cupy.empty(num_tokens * k, dtype=cupy.float32)
    choice_ids = cupy.empty(num_tokens * k, dtype=cupy.int32)
    finite_rows = cupy.empty(num_tokens, dtype=cupy.bool_)
    warps_per_block = 8
    kernel = _kernel("router", f"moerouter::topk_router<{_CUDA_TYPES[dtype_name]}, {per_lane}>")
    kernel(
        (math.ceil(num_tokens / warps_per_block),),
        (32 * warps_per_block,),
        (
            values,
            _i32(num_tokens),
            _i32(num_experts),
            _i32(k),
            _i32(0 if score == "softmax" else 1),
            _i32(int(normalize)),
            _i32(int(softmax_after_topk)),
            probs,
            expert_ids,
            weights,
            choice_ids,
            finite_rows,
        ),
    )
    tokens = cupy.arange(num_tokens, dtype=cupy.int32)
    return Routing(
        token_ids=cupy.repeat(tokens, k),
        expert_ids=expert_ids,
        weights=weights,
        choice_ids=choice_ids,
        probs=probs,
        finite_rows=finite_rows,
        num_tokens=num_tokens,
        num_experts=num_experts,
        layout="token",
        slots=k,
        num_groups=num_groups,
    )


def router(
    values: Any,
    k: int,
    *,
    score: str,
    weights: str,
    num_real: int,
    bias: Any = None,
    eligible: Any = None,
) -> Any:
    """The ``router`` slot (:mod:`moerouter.policies._router`) on :func:`topk_router`.

    Serves what the fused kernel computes: no null columns, no selection bias, ``E <= 512`` and
    ``k <= 32``; anything else returns None (the agnostic reference).
    """
    from array_api_compat import array_namespace

    from moerouter.policies._router import RouterResult

    num_groups, group_size, num_columns = (int(size) for size in values.shape)
    if (
        bias is not None
        or eligible is not None
        or num_real != num_columns
        or num_columns > 32 * ROUTER_PER_LANE[-1]
        or k > ROUTER_MAX_K
        or num_groups * group_size == 0
    ):
        return None
    fused = topk_router(
        values,
        k=k,
        score=score,
        normalize=weights == "renormalize",
        softmax_after_topk=weights == "softmax_after_topk",
    )
    chosen_shape = (num_groups, group_size, k)
    return RouterResult(
        choice=fused.choice_ids.reshape(chosen_shape),
        routed=(fused.expert_ids >= 0).reshape(chosen_shape),
        weights=fused.weights.reshape(chosen_shape),
        probs=fused.probs.reshape(num_groups, group_size, num_columns),
        finite_rows=fused.finite_rows.reshape(num_groups, group_size),
        xp=array_namespace(values),
    )


# ---------------------------------------------------------------------------------------------
# plan


def _counting_sort(keys: Any, num_bins: int) -> tuple[Any, Any, Any]:
    """Stable sort of int32 ``keys`` in ``[0, num_bins)``: (order, inverse, bin_starts)."""
    cupy = _cupy()
    count = int(keys.shape[0])
    num_blocks = max(1, math.ceil(count / _CHUNK))
    block_counts = cupy.zeros((num_blocks, num_bins), dtype=cupy.int32)
    block_offsets = cupy.empty_like(block_counts)
    bin_starts = cupy.empty(num_bins + 1, dtype=cupy.int32)
    order = cupy.empty(count, dtype=cupy.int32)
    inverse = cupy.empty(count, dtype=cupy.int32)
    size, bins = _i32(count), _i32(num_bins)
    count_keys = _kernel("plan", "moerouter::count_keys")
    count_keys((num_blocks,), (256,), (keys, size, bins, block_counts))
    _kernel("plan", "moerouter::scan_offsets")(
        (1,), (1024,), (block_counts, _i32(num_blocks), bins, block_offsets, bin_starts)
    )
    _kernel("plan", "moerouter::scatter_keys")(
        (num_blocks,), (32,), (keys, size, bins, block_offsets, order, inverse)
    )
    return order, inverse, bin_starts


def make_plan(routing: Routing) -> Plan:
    """:func:`moerouter.make_plan` with counting-sort kernels; fields equal the agnostic path's."""
    cupy = _cupy()
    token_ids = _int32(routing.token_ids)
    expert_ids = _int32(routing.expert_ids)
    weights = _float32(routing.weights)
    num_tokens, num_experts, fan_in = routing.num_tokens, routing.num_experts, routing.fan_in
    count = int(expert_ids.shape[0])
    grid = (max(1, math.ceil(count / 256)),)
    keys = cupy.empty(count, dtype=cupy.int32)
    _kernel("plan", "moerouter::expert_sort_keys")(
        grid, (256,), (expert_ids, _i32(count), _i32(num_experts), keys)
    )
    order, inverse, bin_starts = _counting_sort(keys, num_experts + 1)
    source_tokens = cupy.empty(count, dtype=cupy.int32)
    masked_rows = cupy.empty(count, dtype=cupy.int32)
    masked_weights = cupy.empty(count, dtype=cupy.float32)
    _kernel("plan", "moerouter::finish_plan")(
        grid,
        (256,),
        (order, inverse, token_ids, expert_ids, weights, _i32(count), source_tokens,
         masked_rows, masked_weights),
    )  # fmt: skip
    if routing.layout == "token":
        combine_rows = masked_rows.reshape(num_tokens, fan_in)
        combine_weights = masked_weights.reshape(num_tokens, fan_in)
    else:
        by_token, _, token_starts = _counting_sort(token_ids, num_tokens)
        combine_rows = cupy.full((num_tokens, fan_in), -1, dtype=cupy.int32)
        combine_weights = cupy.zeros((num_tokens, fan_in), dtype=cupy.float32)
        _kernel("plan", "moerouter::fill_token_major")(
            grid,
            (256,),
            (by_token, token_ids, token_starts, masked_rows, masked_weights, _i32(count),
             _i32(fan_in), combine_rows, combine_weights),
        )  # fmt: skip
    return Plan(
        group_sizes=(bin_starts[1 : num_experts + 1] - bin_starts[:num_experts]).astype(cupy.int32),
        order=order,
        inverse=inverse,
        source_tokens=source_tokens,
        num_valid=bin_starts[num_experts],
        combine_rows=combine_rows,
        combine_weights=combine_weights,
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


# ---------------------------------------------------------------------------------------------
# dispatch and combine


def _row_launch(row_words: int, num_rows: int) -> tuple[tuple[int], tuple[int, int]]:
    """Threads along a row (up to 64) times rows per block (256 threads per block)."""
    along = 32 if row_words <= 32 else 64
    rows_per_block = 256 // along
    return (max(1, math.ceil(num_rows / rows_per_block)),), (along, rows_per_block)


def dispatch(x: Any, plan: Plan) -> Any:
    """:func:`moerouter.dispatch` on the GPU: raw row copies, 16-byte vectors where aligned."""
    cupy = _cupy()
    rows, dtype_name = to_cupy(x)
    rows = cupy.ascontiguousarray(rows)
    num_rows, features = plan.num_rows, int(rows.shape[1])
    out = cupy.empty((num_rows, features), dtype=rows.dtype)
    row_bytes = features * rows.dtype.itemsize
    word = next(size for size in (16, 4, 2) if row_bytes % size == 0 and rows.data.ptr % size == 0)
    grid, block = _row_launch(row_bytes // word, num_rows)
    _kernel("dispatch", f"moerouter::dispatch_rows<{_WORDS[word]}>")(
        grid,
        block,
        (rows, _int32(plan.source_tokens), _int32(plan.num_valid), _i32(num_rows),
         _i32(row_bytes // word), out),
    )  # fmt: skip
    return from_cupy(out, x, dtype_name)


def combine(ye: Any, plan: Plan) -> Any:
    """:func:`moerouter.combine` on the GPU: float32 gather-reduce in slot order, no atomics."""
    cupy = _cupy()
    rows, dtype_name = to_cupy(ye)
    if dtype_name not in _CUDA_TYPES:
        from array_api_compat import array_namespace

        from moerouter._agnostic import plan as agnostic

        result = agnostic.combine(
            rows,
            _int32(plan.combine_rows),
            _float32(plan.combine_weights),
            xp=array_namespace(rows),
        )
        return from_cupy(result, ye, dtype_name)
    rows = cupy.ascontiguousarray(rows)
    combine_rows = _int32(plan.combine_rows)
    combine_weights = _float32(plan.combine_weights)
    num_tokens, fan_in = (int(n) for n in combine_rows.shape)
    features = int(rows.shape[1])
    out = cupy.empty((num_tokens, features), dtype=rows.dtype)
    vector = _VECTOR[dtype_name]
    if features % vector or rows.data.ptr % 16:
        vector = 1
    grid, block = _row_launch(math.ceil(features / vector), num_tokens)
    cuda_type = _CUDA_TYPES[dtype_name]
    if fan_in <= _PADDED_FAN_IN_LIMIT:
        _kernel("combine", f"moerouter::combine_padded<{cuda_type}, {vector}>")(
            grid,
            block,
            (rows, combine_rows, combine_weights, _i32(num_tokens), _i32(fan_in),
             _i32(features), out),
        )  # fmt: skip
    else:  # expert choice: most of the E slots are empty, read only the real entries
        present = combine_rows >= 0
        indptr = cupy.zeros(num_tokens + 1, dtype=cupy.int32)
        cupy.cumsum(present.sum(axis=1, dtype=cupy.int32), out=indptr[1:])
        entry_rows = cupy.ascontiguousarray(combine_rows[present])
        entry_weights = cupy.ascontiguousarray(combine_weights[present])
        _kernel("combine", f"moerouter::combine_csr<{cuda_type}, {vector}>")(
            grid,
            block,
            (rows, indptr, entry_rows, entry_weights, _i32(num_tokens), _i32(features), out),
        )
    return from_cupy(out, ye, dtype_name)
