"""The routers on the public API: top-k, null experts (AdaMoE), expert choice; and, in a class
of their own, the transport-based routers and Soft MoE.

Routers are latency-bound at these sizes; ``track_gb_per_s`` reports the logits read plus the
ids and weights written per second, for scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import moerouter as mr

from . import common


class Routers:
    params = (common.SHAPE_NAMES, common.BACKENDS, ["TopK", "NullExperts", "ExpertChoice"])
    param_names = ("shape", "backend", "router")
    number = 1
    repeat = (1, 5, 20.0)
    timeout = 300.0

    def setup(self, shape: str, backend: str, router: str) -> None:
        common.skip_unless_installed(backend)
        s = common.SHAPES[shape]
        columns = s.experts
        policy: Any
        if router == "TopK":
            policy = mr.TopK(s.experts, s.k)
        elif router == "NullExperts":
            # reference/performance.md §10.2: E real plus E/2 null experts, same k.
            num_null = max(1, s.experts // 2)
            policy = mr.NullExperts(s.experts, num_null, s.k)
            columns += num_null
        else:
            # Capacity factor k: the same number of assignments as top-k.
            policy = mr.ExpertChoice(s.experts, float(s.k))
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((s.tokens, columns), dtype=np.float32)
        self.logits = common.asarray(backend, logits)
        self.policy = policy
        rows = int(np.count_nonzero(common.to_numpy(policy(self.logits).expert_ids) >= 0))
        self.nbytes = common.router_bytes(s.tokens, columns, rows)

    def time_route(self, shape: str, backend: str, router: str) -> None:
        common.sync(self.policy(self.logits).weights)

    def track_gb_per_s(self, shape: str, backend: str, router: str) -> float:
        seconds = common.median_seconds(lambda: self.policy(self.logits).weights)
        return self.nbytes / seconds / 1e9

    track_gb_per_s.unit = "GB/s"  # type: ignore[attr-defined]


class TransportRouters:
    """The transport-based routers (#3 part B) and Soft MoE, kept apart from the classic three.

    Their cost is dominated by fixed iteration counts (Sinkhorn, Adam on the semi-dual, proposal
    rounds), not by bytes moved, so only time is tracked. Each shape is routed as one group; Soft
    MoE gets ``P = T / E`` slots per expert (vmoe's capacity factor 1: as many slots as tokens).
    """

    params = (
        common.SHAPE_NAMES,
        common.BACKENDS,
        [
            "SinkhornTokenChoice",
            "SinkhornExpertChoice",
            "BalancedAssignment",
            "SparsityConstrainedExpertChoice",
            "SoftMoE",
        ],
    )
    param_names = ("shape", "backend", "router")
    number = 1
    repeat = (1, 5, 20.0)
    timeout = 300.0

    def setup(self, shape: str, backend: str, router: str) -> None:
        common.skip_unless_installed(backend)
        s = common.SHAPES[shape]
        columns = s.experts
        policy: Any
        if router == "SinkhornTokenChoice":
            policy = mr.SinkhornTokenChoice(s.experts, s.k)
        elif router == "SinkhornExpertChoice":
            policy = mr.SinkhornExpertChoice(s.experts, float(s.k))
        elif router == "BalancedAssignment":
            policy = mr.BalancedAssignment(s.experts)
        elif router == "SparsityConstrainedExpertChoice":
            policy = mr.SparsityConstrainedExpertChoice(s.experts, float(s.k))
        else:
            slots = max(1, s.tokens // s.experts)
            policy = mr.SoftMoE(s.experts, slots)
            columns = s.experts * slots
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((s.tokens, columns), dtype=np.float32)
        self.logits = common.asarray(backend, logits)
        self.policy = policy

    def _output(self) -> Any:
        result = self.policy(self.logits)
        return result.combine_weights if isinstance(result, mr.SoftRouting) else result.weights

    def time_route(self, shape: str, backend: str, router: str) -> None:
        common.sync(self._output())
