"""Reused output buffers never overwrite data the caller can still reach, and stay bounded.

Failure model: the NumPy backend and the torch CPU kernels hand out large outputs from a pool
(:mod:`moerouter._buffers`) to avoid page faults. Two ways a pool goes wrong silently:

* it hands out a buffer something still reaches (the caller's array, a view, a storage object,
  an autograd-saved tensor, ``.grad``, a tensor another thread holds), and the next call
  overwrites that data without an error;
* it never lets go, and memory grows with every new shape.

Each test holds a result one way, drops every other reference, calls again with other values and
checks the held data is unchanged; then it drops the holder and checks the memory *is* reused (so
the first check is not vacuous). Threads compare every result with a pool-free reference. The
bound is measured on the pool's own byte count (not RSS) over 1,000 shapes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import moerouter as mr
from moerouter import _buffers, _numpy_backend

torch = pytest.importorskip("torch")
moerouter_torch = pytest.importorskip("moerouter_torch")
from moerouter_torch import _workspace  # noqa: E402

# dispatch output: 2048 rows x 256 float32 = 2 MiB, over the 1 MiB pooling threshold.
TOKENS, FEATURES, EXPERTS, K = 1024, 256, 8, 2


@pytest.fixture(autouse=True)
def empty_pools(monkeypatch):
    for name in ("MOEROUTER_BACKEND", "MOEROUTER_NUMPY_CACHE_MB", "MOEROUTER_TORCH_CACHE_MB"):
        monkeypatch.delenv(name, raising=False)
    _numpy_backend.clear_cache()
    moerouter_torch.release_workspaces()
    yield
    _numpy_backend.clear_cache()
    moerouter_torch.release_workspaces()


def _logits(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, EXPERTS)).astype(np.float32)


def _rows(tokens: int, seed: int, features: int = FEATURES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, features)).astype(np.float32)


def _torch_plan(tokens: int = TOKENS):
    return mr.make_plan(mr.TopK(EXPERTS, K)(torch.from_numpy(_logits(tokens))))


def _numpy_plan(tokens: int = TOKENS):
    return mr.make_plan(mr.TopK(EXPERTS, K)(_logits(tokens)))


def _address(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return int(array.__array_interface__["data"][0])
    return int(array.data_ptr())


# --------------------------------------------------------------------------------------------
# torch: every way user code can keep a storage alive


def _as_grad(xe):
    parameter = torch.zeros_like(xe, requires_grad=True)
    parameter.grad = xe
    return parameter


TORCH_HOLDERS = [
    pytest.param(lambda xe: xe, lambda held: held, id="tensor"),
    # A view shares the storage, offset and strided.
    pytest.param(lambda xe: xe[3:].t(), lambda held: held.t(), id="view"),
    # The reproducer: a bare UntypedStorage object outlives every tensor on it.
    pytest.param(
        lambda xe: xe.untyped_storage(),
        lambda held: torch.tensor([]).set_(held, 0, (2 * TOKENS, FEATURES)),
        id="untyped-storage",
    ),
    pytest.param(lambda xe: xe.numpy(), torch.from_numpy, id="numpy-export"),
    # A NumPy array imported through DLPack holds the exporting tensor.
    pytest.param(np.from_dlpack, torch.from_numpy, id="dlpack-to-numpy"),
    pytest.param(_as_grad, lambda p: p.grad, id="grad"),
]


@pytest.mark.parametrize(("hold", "read"), TORCH_HOLDERS)
def test_torch_held_buffers_are_never_reused(hold, read):
    plan = _torch_plan()
    xe = mr.dispatch(torch.from_numpy(_rows(TOKENS, 1)), plan)
    address = xe.data_ptr()
    held = hold(xe)
    del xe
    snapshot = read(held).clone()
    for _ in range(2):  # a second call could pick the first free buffer again
        again = mr.dispatch(torch.full((TOKENS, FEATURES), -7.0), plan)
        assert again.data_ptr() != address
        del again
    assert torch.equal(read(held), snapshot)
    del held
    # Dropped everywhere: the buffer is handed out again (so the checks above were not vacuous).
    both = [mr.dispatch(torch.from_numpy(_rows(TOKENS, 4)), plan) for _ in range(2)]
    assert address in {tensor.data_ptr() for tensor in both}


def test_torch_autograd_saved_buffer_is_never_reused():
    # The expert's input saved for backward must survive later dispatches (the next layer's).
    plan = _torch_plan()
    x = torch.from_numpy(_rows(TOKENS, 1))
    expected = mr.dispatch(x, plan).sum(0, keepdim=True)  # d loss / d scale below
    xe = mr.dispatch(x, plan)
    address = xe.data_ptr()
    scale = torch.ones(1, FEATURES, requires_grad=True)
    loss = (xe * scale).sum()  # mul saves xe for the gradient of scale
    del xe
    for _ in range(2):
        assert mr.dispatch(torch.full((TOKENS, FEATURES), -7.0), plan).data_ptr() != address
    loss.backward()
    assert torch.equal(scale.grad, expected)
    del loss  # the graph, and the saved tensor with it, is freed by backward
    both = [mr.dispatch(x, plan) for _ in range(2)]
    assert address in {tensor.data_ptr() for tensor in both}


def test_torch_buffer_held_by_another_thread_is_never_reused():
    plan = _torch_plan()
    handoff: queue.Queue[Any] = queue.Queue()
    done: queue.Queue[bool] = queue.Queue()
    released = threading.Event()

    def consumer() -> None:
        tensor, snapshot = handoff.get()
        released.wait()  # the producer has dropped its reference and dispatched again
        done.put(torch.equal(tensor, snapshot))

    thread = threading.Thread(target=consumer)
    thread.start()
    xe = mr.dispatch(torch.from_numpy(_rows(TOKENS, 1)), plan)
    handoff.put((xe, xe.clone()))
    del xe
    for _ in range(2):
        mr.dispatch(torch.full((TOKENS, FEATURES), -7.0), plan)
    released.set()
    thread.join(timeout=60)
    assert done.get(timeout=1)


# --------------------------------------------------------------------------------------------
# NumPy: views and exports


NUMPY_HOLDERS = [
    pytest.param(lambda xe: xe, id="array"),
    pytest.param(lambda xe: xe[5:].T, id="view"),
    pytest.param(memoryview, id="memoryview"),
    pytest.param(lambda xe: np.frombuffer(xe, dtype=np.float32), id="frombuffer"),
    pytest.param(lambda xe: np.from_dlpack(xe), id="dlpack"),
    pytest.param(torch.from_numpy, id="torch-from-numpy"),
    pytest.param(lambda xe: xe.base, id="base"),  # the pooled region itself
]


@pytest.mark.parametrize("hold", NUMPY_HOLDERS)
def test_numpy_held_buffers_are_never_reused(hold):
    plan = _numpy_plan()
    xe = mr.dispatch(_rows(TOKENS, 1), plan)
    address = _address(xe)
    held = hold(xe)
    del xe
    snapshot = np.array(np.asarray(held), copy=True)
    for _ in range(2):
        again = mr.dispatch(np.full((TOKENS, FEATURES), -7.0, dtype=np.float32), plan)
        assert _address(again) != address
        del again
    np.testing.assert_array_equal(np.asarray(held), snapshot)
    del held
    both = [mr.dispatch(_rows(TOKENS, 4), plan) for _ in range(2)]
    assert address in {_address(array) for array in both}


def test_numpy_combine_output_held_is_never_reused():
    # combine's (T, d) outputs come from the same pool (1 MiB at 1024 x 256 float32).
    plan = _numpy_plan()
    ye = _rows(plan.num_rows, 1)
    first = mr.combine(ye, plan)
    snapshot = first.copy()
    second = mr.combine(ye * 2, plan)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, snapshot)


# --------------------------------------------------------------------------------------------
# Threads: every result equals a pool-free reference while 4+ threads share the pool


def _reference_results(make, tasks):
    return [make(task) for task in tasks]


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_pools_under_threads_match_a_pool_free_reference(library, monkeypatch):
    asarray: Callable[[np.ndarray], Any] = np.asarray if library == "numpy" else torch.from_numpy
    to_numpy: Callable[[Any], np.ndarray] = np.asarray if library == "numpy" else torch.Tensor.numpy
    # Two token counts, so threads compete for buffers of the same size and of different sizes.
    plans = {
        tokens: mr.make_plan(mr.TopK(EXPERTS, K)(asarray(_logits(tokens))))
        for tokens in (1024, 1536)
    }
    threads, rounds = 6, 12
    tasks = [
        (thread, r, (1024, 1536)[(thread + r) % 2])
        for thread in range(threads)
        for r in range(rounds)
    ]

    def run(task):
        thread, r, tokens = task
        x = asarray(_rows(tokens, 100 * thread + r))
        plan = plans[tokens]
        xe = mr.dispatch(x, plan)
        return xe, mr.combine(xe, plan)

    variable = "MOEROUTER_NUMPY_CACHE_MB" if library == "numpy" else "MOEROUTER_TORCH_CACHE_MB"
    with monkeypatch.context() as patch:
        patch.setenv(variable, "0")  # the pool-free reference
        expected = {task: tuple(np.array(to_numpy(a)) for a in run(task)) for task in tasks}
    pool = _numpy_backend._pool if library == "numpy" else _workspace.pool
    assert len(pool) == 0
    failures: list[str] = []
    barrier = threading.Barrier(threads)

    def worker(thread: int) -> None:
        barrier.wait()
        kept = []  # some results stay alive across later calls, as activations do
        for task in tasks[thread * rounds : (thread + 1) * rounds]:
            xe, y = run(task)
            for got, want in zip((xe, y), expected[task], strict=True):
                if not np.array_equal(to_numpy(got), want):
                    failures.append(f"{task} differs right after the call")
            if task[1] % 3 == 0:
                kept.append((task, xe, y))
        for task, xe, y in kept:
            for got, want in zip((xe, y), expected[task], strict=True):
                if not np.array_equal(to_numpy(got), want):
                    failures.append(f"{task} was overwritten while held")

    workers = [threading.Thread(target=worker, args=(thread,)) for thread in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in workers)
    assert failures == []
    assert len(pool) > 0  # the pool was in use, not bypassed


# --------------------------------------------------------------------------------------------
# Bounded memory


@pytest.fixture
def one_torch_thread():
    # 1,000 small calls: on a loaded machine each intra-op parallel region waits for a time slice.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_pool_bytes_stay_under_the_cap_over_1000_shapes(library, monkeypatch, one_torch_thread):
    limit_mb = 24
    variable = "MOEROUTER_NUMPY_CACHE_MB" if library == "numpy" else "MOEROUTER_TORCH_CACHE_MB"
    monkeypatch.setenv(variable, str(limit_mb))
    pool = _numpy_backend._pool if library == "numpy" else _workspace.pool
    # One plan (R = 1024 rows), a new width each call: 1,000 output sizes from 1 to 5 MiB.
    tokens = 512
    rows = _rows(tokens, 1, features=1256)
    plan = _numpy_plan(tokens) if library == "numpy" else _torch_plan(tokens)
    peak = 0
    for width in range(256, 1256):
        x = rows[:, :width].copy()
        mr.dispatch(x if library == "numpy" else torch.from_numpy(x), plan)  # result dropped
        peak = max(peak, pool.nbytes())
    assert 0 < peak <= limit_mb << 20
    assert len(pool) <= limit_mb


# --------------------------------------------------------------------------------------------
# The pool itself


def _megabytes(pool: _buffers.BufferPool, count: int) -> Any:
    return pool.take(count << 20, lambda region: region.view(np.float32))


def _pooled(pool: _buffers.BufferPool, array: np.ndarray) -> bool:
    return any(np.shares_memory(array, buffer) for buffer in pool._buffers)


def test_least_recently_used_buffer_is_evicted_first(monkeypatch):
    monkeypatch.setenv("MOEROUTER_TEST_POOL_MB", "7")  # room for three 2 MiB buffers
    pool = _buffers.BufferPool("MOEROUTER_TEST_POOL_MB")
    a, b, c = (_megabytes(pool, 2) for _ in range(3))  # held at once: three buffers, a oldest
    assert len(pool) == 3
    address_b = _address(b)
    del b
    b = _megabytes(pool, 2)  # reuses b's buffer, which becomes the most recently used
    assert _address(b) == address_b
    new = _megabytes(pool, 1)  # needs room: a, least recently used, goes (though still held)
    assert not _pooled(pool, a) and _pooled(pool, b) and _pooled(pool, c) and _pooled(pool, new)
    bigger = _megabytes(pool, 3)  # next out: c, then nothing more (6 MiB fit)
    assert not _pooled(pool, c) and _pooled(pool, b) and _pooled(pool, new)
    assert _pooled(pool, bigger)
    assert pool.nbytes() <= 7 << 20


def test_evicting_a_held_buffer_leaves_it_with_its_holder(monkeypatch):
    monkeypatch.setenv("MOEROUTER_TEST_POOL_MB", "3")
    pool = _buffers.BufferPool("MOEROUTER_TEST_POOL_MB")
    held = _megabytes(pool, 2)
    held[:] = 5.0
    other = _megabytes(pool, 2)  # no room for both: the held one is forgotten, not reused
    other[:] = -1.0
    assert not np.shares_memory(held, other)
    assert np.all(held == 5.0)
    assert pool.nbytes() <= 3 << 20


def test_a_lower_limit_applies_at_the_next_call(monkeypatch):
    monkeypatch.setenv("MOEROUTER_TEST_POOL_MB", "16")
    pool = _buffers.BufferPool("MOEROUTER_TEST_POOL_MB")
    held = [_megabytes(pool, 2) for _ in range(6)]
    del held
    assert len(pool) == 6
    monkeypatch.setenv("MOEROUTER_TEST_POOL_MB", "5")
    _megabytes(pool, 2)  # a hit on a free buffer still trims the pool to the new limit
    assert pool.nbytes() <= 5 << 20


def test_sizes_outside_the_pooled_range_are_not_pooled(monkeypatch):
    pool = _buffers.BufferPool("MOEROUTER_TEST_POOL_MB", default_megabytes=4)
    assert pool.take(_buffers.MIN_POOLED_BYTES - 1, lambda region: region) is None
    assert pool.take(5 << 20, lambda region: region) is None  # over the limit
    monkeypatch.setenv("MOEROUTER_TEST_POOL_MB", "0")
    assert pool.take(2 << 20, lambda region: region) is None  # pooling off
    assert len(pool) == 0


def test_a_bad_limit_names_the_variable(monkeypatch):
    monkeypatch.setenv("MOEROUTER_TEST_POOL_MB", "lots")
    pool = _buffers.BufferPool("MOEROUTER_TEST_POOL_MB")
    with pytest.raises(ValueError, match="MOEROUTER_TEST_POOL_MB"):
        pool.take(2 << 20, lambda region: region)
