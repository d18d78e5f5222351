"""A token's combine output is bit-identical whatever else is in its batch, on every path.

Failure model: a combine whose arithmetic for one token depends on the other tokens. The NumPy
fallback did this: one ``np.matmul`` per block of tokens, sized by the block's largest fan-in,
rounded a token's sum differently (by an ulp) when its neighbours had more entries. Such a kernel
passes every "close to the reference" test and still breaks the contract: a served request's
output would change with whom it is batched, and a training run would not replay bit for bit.

Each case routes the probe tokens identically in two batches: a *narrow* one, where every other
token has fewer entries than the probes, and a *wide* one, where the other tokens use every slot
(other experts too), so the probes' rows move in the dispatch buffer and share blocks with wider
tokens. Expert outputs are a pure function of (token, expert), and rows past ``num_valid`` hold NaN
(they must never be read). The probes' outputs must agree bit for bit, on every combine path and
dtype: NumPy with SciPy (CSR), without SciPy (blocked), split over threads; the agnostic reference
on NumPy and array-api-strict; torch's CPU kernels; torch's Triton kernel and JAX's Pallas kernel
in their CPU interpreters; JAX eager and jitted. Both routing layouts (token and expert) run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pytest

import moerouter as mr
from moerouter import _numpy_backend
from moerouter.testing import to_numpy, use_backend

# Triton's interpreter must be chosen before Triton is first imported (as in test_triton.py).
if "triton" not in sys.modules and importlib.util.find_spec("torch") is not None:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Tiny, so the Triton and Pallas interpreters stay fast; D is not a power of two.
TOKENS, SLOTS, EXPERTS, FEATURES = 16, 6, 8, 40
PROBES = list(range(0, TOKENS, 3))


# --------------------------------------------------------------------------------------------
# The two batches


def _entries(wide: bool) -> list[list[tuple[int, int, float]]]:
    """Per token: (slot, expert, weight) entries. Probes are the same in both batches."""
    probe_rng = np.random.default_rng(1)
    other_rng = np.random.default_rng(2 if wide else 3)
    entries = []
    for token in range(TOKENS):
        if token in PROBES:
            fan_in, rng = 1 + PROBES.index(token) % 3, probe_rng  # 1 to 3, with holes
            slots = np.sort(rng.choice(SLOTS, fan_in, replace=False))
        else:
            fan_in, rng = (SLOTS if wide else token % 3), other_rng  # 6, or 0 to 2
            slots = np.arange(fan_in)
        experts = rng.choice(EXPERTS, fan_in, replace=False)
        weights = rng.random(fan_in).astype(np.float32)
        entries.append(list(zip(slots.tolist(), experts.tolist(), weights.tolist(), strict=True)))
    return entries


def _routing_arrays(wide: bool, layout: str) -> dict[str, Any]:
    """NumPy arrays of a Routing in the token layout (k = SLOTS, -1 holes) or the expert one
    (every expert lists every token, C = T, and drops those that did not choose it)."""
    entries = _entries(wide)
    if layout == "token":
        token_ids = np.repeat(np.arange(TOKENS, dtype=np.int32), SLOTS)
        expert_ids = np.full((TOKENS, SLOTS), -1, dtype=np.int32)
        weights = np.zeros((TOKENS, SLOTS), dtype=np.float32)
        for token, chosen in enumerate(entries):
            for slot, expert, weight in chosen:
                expert_ids[token, slot], weights[token, slot] = expert, weight
        slots = SLOTS
    else:
        token_ids = np.tile(np.arange(TOKENS, dtype=np.int32), EXPERTS)
        expert_ids = np.full((EXPERTS, TOKENS), -1, dtype=np.int32)
        weights = np.zeros((EXPERTS, TOKENS), dtype=np.float32)
        for token, chosen in enumerate(entries):
            for _, expert, weight in chosen:
                expert_ids[expert, token], weights[expert, token] = expert, weight
        slots = TOKENS
    return {
        "token_ids": token_ids,
        "expert_ids": expert_ids.reshape(-1),
        "weights": weights.reshape(-1),
        "layout": layout,
        "slots": slots,
    }


def _routing(arrays: dict[str, Any], asarray: Callable[[np.ndarray], Any]) -> mr.Routing:
    expert_ids = arrays["expert_ids"]
    return mr.Routing(
        token_ids=asarray(arrays["token_ids"]),
        expert_ids=asarray(expert_ids),
        weights=asarray(arrays["weights"]),
        choice_ids=asarray(np.maximum(expert_ids, 0)),
        probs=asarray(np.zeros((TOKENS, EXPERTS), dtype=np.float32)),
        finite_rows=asarray(np.ones(TOKENS, dtype=bool)),
        num_tokens=TOKENS,
        num_experts=EXPERTS,
        layout=arrays["layout"],
        slots=arrays["slots"],
    )


def _expert_rows(plan: mr.Plan, expert_ids: np.ndarray) -> np.ndarray:
    """float64 rows: each a function of (token, expert) only; NaN past num_valid."""
    rng = np.random.default_rng(7)
    scale = 2.0 ** rng.integers(-6, 7, size=(TOKENS, EXPERTS, 1))
    table = rng.standard_normal((TOKENS, EXPERTS, FEATURES)) * scale
    order = to_numpy(plan.order)
    valid = int(to_numpy(plan.num_valid))
    rows = np.full((plan.num_rows, FEATURES), np.nan)
    tokens = to_numpy(plan.source_tokens)[:valid]
    rows[:valid] = table[tokens, expert_ids[order[:valid]]]
    return rows


# --------------------------------------------------------------------------------------------
# The paths


def _reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")


def _numpy_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_numpy_backend, "_scipy_sparse", lambda: None)


def _numpy_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Split the tokens over 3 threads (a split that follows neither batch nor probe positions).
    monkeypatch.setattr(_numpy_backend, "_THREADED_MIN_BYTES", 1)
    monkeypatch.setenv("MOEROUTER_NUM_THREADS", "3")


def _numpy_threads_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    _numpy_threads(monkeypatch)
    _numpy_without_scipy(monkeypatch)


@contextmanager
def _jax_x64(dtype: str) -> Iterator[None]:
    if dtype != "float64":
        yield
        return
    import jax

    if callable(getattr(jax, "enable_x64", None)):  # jax >= 0.8
        with jax.enable_x64(True):
            yield
    else:  # older jax
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def _library(name: str) -> Any:
    module = pytest.importorskip(name)
    if name == "torch":
        pytest.importorskip("moerouter_torch")
    if name == "jax":
        pytest.importorskip("moerouter_jax")
    return module


def _converter(library: str, dtype: str | None) -> Callable[[np.ndarray], Any]:
    if library == "numpy":
        if dtype == "bfloat16":
            dtype = pytest.importorskip("ml_dtypes").bfloat16  # NumPy's bfloat16 (JAX's too)
        return lambda a: a if dtype is None else a.astype(dtype)
    if library == "array_api_strict":
        xp = _library(library)
        return lambda a: xp.asarray(a if dtype is None else a.astype(dtype))
    if library == "torch":
        torch = _library(library)
        return lambda a: torch.from_numpy(a if dtype is None else a.astype(np.float64)).to(
            getattr(torch, dtype) if dtype else None
        )
    jnp = _library("jax").numpy
    return lambda a: jnp.asarray(a) if dtype is None else jnp.asarray(a).astype(dtype)


def _mr_combine(ye: Any, plan: mr.Plan) -> Any:
    return mr.combine(ye, plan)


def _jax_jit_combine(ye: Any, plan: mr.Plan) -> Any:
    import jax

    return jax.jit(mr.combine)(ye, plan)


def _triton_combine(ye: Any, plan: mr.Plan) -> Any:
    if os.environ.get("TRITON_INTERPRET") != "1":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set; no CUDA")
    pytest.importorskip("triton")
    from moerouter_torch import _triton

    return _triton.combine(ye, plan.combine_rows, plan.combine_weights)


def _pallas_combine(ye: Any, plan: mr.Plan) -> Any:
    from moerouter_jax import _pallas

    return _pallas.gather_reduce(ye, plan.combine_rows, plan.combine_weights, interpret=True)


NUMPY_DTYPES = ["float16", "bfloat16", "float32", "float64"]
TORCH_DTYPES = ["float16", "bfloat16", "float32", "float64"]
LOW_PRECISION = ["float16", "bfloat16", "float32"]

# (id, library, dtypes, setup, combine)
PATHS: list[tuple[str, str, list[str], Callable[..., None] | None, Callable[..., Any]]] = [
    # SciPy's CSR product for float32/float64; float16 takes the blocked path even with SciPy.
    ("numpy-scipy", "numpy", NUMPY_DTYPES, None, _mr_combine),
    # The blocked fallback for every dtype (the path that was not batch invariant).
    ("numpy-no-scipy", "numpy", NUMPY_DTYPES, _numpy_without_scipy, _mr_combine),
    ("numpy-threads", "numpy", NUMPY_DTYPES, _numpy_threads, _mr_combine),
    ("numpy-threads-no-scipy", "numpy", NUMPY_DTYPES, _numpy_threads_without_scipy, _mr_combine),
    ("reference-numpy", "numpy", NUMPY_DTYPES, _reference, _mr_combine),
    ("reference-strict", "array_api_strict", ["float32", "float64"], None, _mr_combine),
    # embedding_bag; bfloat16/float16 with the weights split into three exact parts.
    ("torch-cpu", "torch", TORCH_DTYPES, None, _mr_combine),
    ("torch-triton", "torch", LOW_PRECISION, None, _triton_combine),
    ("jax", "jax", TORCH_DTYPES, None, _mr_combine),
    ("jax-jit", "jax", TORCH_DTYPES, None, _jax_jit_combine),
    ("jax-pallas", "jax", LOW_PRECISION, None, _pallas_combine),
]

CASES = [
    pytest.param(library, dtype, setup, combine, layout, id=f"{name}-{dtype}-{layout}")
    for name, library, dtypes, setup, combine in PATHS
    for dtype in dtypes
    for layout in ("token", "expert")
]


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.delenv("MOEROUTER_NUM_THREADS", raising=False)
    with use_backend():
        yield


@pytest.mark.parametrize(("library", "dtype", "setup", "combine", "layout"), CASES)
def test_probe_tokens_are_bit_identical_in_narrow_and_wide_batches(
    monkeypatch, library, dtype, setup, combine, layout
):
    _converter(library, None)  # skips when the library or its plugin is missing
    if setup is not None:
        setup(monkeypatch)
    outputs, rows = [], []
    with _jax_x64(dtype) if library == "jax" else nullcontext():
        for wide in (False, True):
            arrays = _routing_arrays(wide, layout)
            plan = mr.make_plan(_routing(arrays, _converter(library, None)))
            ye = _converter(library, dtype)(_expert_rows(plan, arrays["expert_ids"]))
            outputs.append(to_numpy(combine(ye, plan))[PROBES])
            inverse = to_numpy(plan.inverse)
            rows.append([inverse[arrays["token_ids"] == t].tolist() for t in PROBES])
    narrow, wide_output = outputs
    assert rows[0] != rows[1]  # the probes' rows moved in the dispatch buffer
    assert np.isfinite(narrow).all()  # no row past num_valid leaked in
    assert narrow.dtype == wide_output.dtype
    bits = narrow.dtype.newbyteorder("=").str.replace("f", "u")
    assert np.array_equal(narrow.view(bits), wide_output.view(bits))
