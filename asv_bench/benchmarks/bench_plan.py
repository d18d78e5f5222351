"""make_plan, dispatch and combine on the public API, next to the naive one-liners.

``time_*`` are asv timings; ``track_bw_efficiency`` times the op and a copy in the same process
and reports ``(minimal_bytes / time) / copy_bandwidth``. The ``path`` parameter runs each op
through the kernel the registry picks ("auto") and through the agnostic reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import moerouter as mr

from . import common


class _Bench:
    number = 1  # one call per sample: the big shapes take tens to hundreds of ms
    repeat = (1, 5, 20.0)
    timeout = 300.0

    def prepare(self, shape: str, backend: str) -> None:
        common.skip_unless_installed(backend)
        self.problem = common.Problem(shape, backend)
        # One untimed call of each op: asv --quick times a single call, which must not be the
        # one that pays for first-use costs (thread pools, lazy plugin loading, page faults).
        for op in self.ops():
            op()

    def ops(self) -> list[Callable[[], Any]]:
        raise NotImplementedError


class _PathBench(_Bench):
    params = (common.SHAPE_NAMES, common.BACKENDS, common.PATHS)
    param_names = ("shape", "backend", "path")

    def setup(self, shape: str, backend: str, path: str) -> None:
        common.choose_path(path)
        self.prepare(shape, backend)

    def teardown(self, shape: str, backend: str, path: str) -> None:
        common.choose_path("auto")


class _BaselineBench(_Bench):
    params = (common.SHAPE_NAMES, common.BACKENDS)
    param_names = ("shape", "backend")

    def setup(self, shape: str, backend: str) -> None:
        self.prepare(shape, backend)


class MakePlan(_PathBench):
    def ops(self) -> list[Callable[[], Any]]:
        return [lambda: mr.make_plan(self.problem.routing)]

    def time_make_plan(self, shape: str, backend: str, path: str) -> None:
        common.sync(mr.make_plan(self.problem.routing).combine_rows)


class Dispatch(_PathBench):
    def ops(self) -> list[Callable[[], Any]]:
        return [self.problem.dispatch]

    def time_dispatch(self, shape: str, backend: str, path: str) -> None:
        common.sync(self.problem.dispatch())

    def track_bw_efficiency(self, shape: str, backend: str, path: str) -> float:
        p = self.problem
        return common.bw_efficiency(backend, p.dispatch, p.dispatch_bytes())

    track_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


class Combine(_PathBench):
    def ops(self) -> list[Callable[[], Any]]:
        return [self.problem.combine]

    def time_combine(self, shape: str, backend: str, path: str) -> None:
        common.sync(self.problem.combine())

    def track_bw_efficiency(self, shape: str, backend: str, path: str) -> float:
        p = self.problem
        return common.bw_efficiency(backend, p.combine, p.combine_bytes())

    track_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


class NaiveDispatch(_BaselineBench):
    """``x[idx]``: fancy indexing into a fresh array."""

    def ops(self) -> list[Callable[[], Any]]:
        return [self.problem.naive_dispatch]

    def time_fancy_index(self, shape: str, backend: str) -> None:
        common.sync(self.problem.naive_dispatch())

    def track_bw_efficiency(self, shape: str, backend: str) -> float:
        p = self.problem
        return common.bw_efficiency(backend, p.naive_dispatch, p.dispatch_bytes())

    track_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


class NaiveCombine(_BaselineBench):
    """``np.add.at`` / ``index_add_`` of weighted rows into zeros."""

    def ops(self) -> list[Callable[[], Any]]:
        return [self.problem.naive_combine]

    def time_scatter_add(self, shape: str, backend: str) -> None:
        common.sync(self.problem.naive_combine())

    def track_bw_efficiency(self, shape: str, backend: str) -> float:
        p = self.problem
        # np.add.at takes about a second at the big shapes: one timed call.
        return common.bw_efficiency(backend, p.naive_combine, p.combine_bytes(), repeat=1)

    track_bw_efficiency.unit = "fraction of copy"  # type: ignore[attr-defined]


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
