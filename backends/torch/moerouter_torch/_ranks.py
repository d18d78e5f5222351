"""Test support: run a function on ``world`` Gloo ranks in fresh processes, and never hang.

The expert-parallel tests (``backends/torch/tests/test_distributed.py``,
``tests/reliability/test_distributed_faults.py``) share it. Collectives time out after
``timeout`` seconds, so a stranded one raises in the ranks; the launcher kills ranks still alive
after ``join_timeout`` seconds and raises, so a hang fails the test instead of stalling CI. A fork
server with torch already imported starts the ranks: on a loaded 2-core machine the imports
would otherwise take most of the budget, and skew the ranks by more than the timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rank_main(
    rank: int, world: int, port: int, timeout: float, check: Callable[..., None], args: Any
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        check(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(
    check: Callable[..., None],
    world: int,
    *args: Any,
    timeout: float = 20.0,
    join_timeout: float = 55.0,
) -> None:
    """Run ``check(rank, world, *args)`` on ``world`` Gloo ranks; raise if any rank fails.

    ``check`` must be a module-level function (it is pickled by reference). A rank's exception
    is re-raised here as ``torch.multiprocessing.ProcessRaisedException`` with its traceback;
    ranks still running after ``join_timeout`` seconds are killed and ``TimeoutError`` raised.
    """
    # The first torch op of a process imports torch._dynamo (and sympy): seconds per rank on a
    # loaded machine, enough to trip a short collective timeout while the others wait.
    preload = ["torch", "torch._dynamo", "array_api_compat.torch", "moerouter_torch.distributed"]
    multiprocessing.set_forkserver_preload(preload)
    context = mp.start_processes(
        _rank_main,
        args=(world, _free_port(), timeout, check, args),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + join_timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"ranks still running after {join_timeout} s: a hang")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
