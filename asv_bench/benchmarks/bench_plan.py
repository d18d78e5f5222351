"""make_plan, dispatch and combine on the public API, next to the naive one-liners.

``time_*`` are asv timings; ``track_bw_efficiency`` times the op and a copy in the same process
and reports ``(minimal_bytes / time) / copy_bandwidth``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import moerouter as mr

from . import common


class _PlanBench:
    params = (common.SHAPE_NAMES, common.BACKENDS)
    param_names = ("shape", "backend")
    number = 1  # one call per sample: the big shapes take tens to hundreds of ms
    repeat = (1, 5, 20.0)
    timeout = 300.0

    def setup(self, shape: str, backend: str) -> None:
        common.skip_unless_installed(backend)
        self.problem = common.Problem(shape, backend)
        # One untimed call of each op: asv --quick times a single call, which must not be the
        # one that pays for first-use costs (thread pools, lazy plugin loading).
        for op in self.ops():
            op()

    def ops(self) -> list[Callable[[], Any]]:
        raise NotImplementedError


class MakePlan(_PlanBench):
    def ops(self) -> list[Callable[[], Any]]:
        return [lambda: mr.make_plan(self.problem.routing)]

    def time_make_plan(self, shape: str, backend: str) -> None:
        common.sync(mr.make_plan(self.problem.routing).combine_rows)


class Dispatch(_PlanBench):
    def ops(self) -> list[Callable[[], Any]]:
        return [self.problem.dispatch, self.problem.naive_dispatch]

    def time_dispatch(self, shape: str, backend: str) -> None:
        common.sync(self.problem.dispatch())

    def time_naive_fancy_index(self, shape: str, backend: str) -> None:
        common.sync(self.problem.naive_dispatch())

    def track_bw_efficiency(self, shape: str, backend: str) -> float:
        p = self.problem
        return common.bw_efficiency(backend, p.dispatch, p.dispatch_bytes())

    track_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]

    def track_naive_bw_efficiency(self, shape: str, backend: str) -> float:
        p = self.problem
        return common.bw_efficiency(backend, p.naive_dispatch, p.dispatch_bytes())

    track_naive_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


class Combine(_PlanBench):
    def ops(self) -> list[Callable[[], Any]]:
        return [self.problem.combine, self.problem.naive_combine]

    def time_combine(self, shape: str, backend: str) -> None:
        common.sync(self.problem.combine())

    def time_naive_scatter_add(self, shape: str, backend: str) -> None:
        common.sync(self.problem.naive_combine())

    def track_bw_efficiency(self, shape: str, backend: str) -> float:
        p = self.problem
        return common.bw_efficiency(backend, p.combine, p.combine_bytes())

    track_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]

    def track_naive_bw_efficiency(self, shape: str, backend: str) -> float:
        p = self.problem
        # np.add.at takes about a second at the big shapes: one timed call.
        return common.bw_efficiency(backend, p.naive_combine, p.combine_bytes(), repeat=1)

    track_naive_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


class CopyRoof:
    """The yardstick itself, so a slower machine shows up as such in the history."""

    params = (common.BACKENDS,)
    param_names = ("backend",)
    timeout = 120.0

    def setup(self, backend: str) -> None:
        common.skip_unless_installed(backend)

    def track_copy_gb_per_s(self, backend: str) -> float:
        return common.copy_bandwidth(backend) / 1e9

    track_copy_gb_per_s.unit = "GB/s"  # type: ignore[attr-defined]
