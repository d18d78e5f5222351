"""The routers on the public API: top-k, null experts (AdaMoE), expert choice, and the family
of issue #3: DeepSeek (groups and bias), GShard's random second expert, batch-prioritised
capacity, hash routing, and the padded (E, C) plan; and, in a class of their own, the
transport-based routers and Soft MoE.

Routers are latency-bound at these sizes; ``track_gb_per_s`` reports the logits read plus the
ids and weights written per second, for scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import moerouter as mr

from . import common


class Routers:
    params = (
        common.SHAPE_NAMES,
        common.BACKENDS,
        [
            "TopK",
            "TopP",
            "ReLURouting",
            "CausalExpertChoice",
            "NullExperts",
            "ExpertChoice",
            "DeepSeekTopK",
            "GShardTop2",
            "TopK-BPR",
            "HashRouter",
            "TopK-BPR+padded-plan",
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
        rng = np.random.default_rng(0)
        policy: Any
        extra: tuple[Any, ...] = ()
        if router == "TopK":
            policy = mr.TopK(s.experts, s.k)
        elif router == "TopP":
            # Huang et al.'s p = 0.4, at most k experts: never more rows than top-k.
            policy = mr.TopP(s.experts, 0.4, s.k)
        elif router == "ReLURouting":
            # Every positive gate up to k: about half the experts are positive at random logits.
            policy = mr.ReLURouting(s.experts, s.k)
        elif router == "CausalExpertChoice":
            # The inference rule (thresholds at the uniform probability), per token.
            policy = mr.CausalExpertChoice(s.experts, float(s.k))
            extra = (common.asarray(backend, np.full(s.experts, 1 / s.experts, np.float32)),)
        elif router == "NullExperts":
            # reference/performance.md §10.2: E real plus E/2 null experts, same k.
            num_null = max(1, s.experts // 2)
            policy = mr.NullExperts(s.experts, num_null, s.k)
            columns += num_null
        elif router == "ExpertChoice":
            # Capacity factor k: the same number of assignments as top-k.
            policy = mr.ExpertChoice(s.experts, float(s.k))
        elif router == "DeepSeekTopK":
            # DeepSeek-V3's shape scaled: E/8 experts per group (at least 1), keep half the
            # groups, a selection bias and a routed scaling factor.
            groups = min(8, s.experts)
            policy = mr.DeepSeekTopK(
                s.experts,
                s.k,
                num_groups=groups,
                topk_groups=max(1, groups // 2),
                routed_scaling_factor=2.5,
            )
            bias = (rng.standard_normal(s.experts) * 0.01).astype(np.float32)
            extra = (common.asarray(backend, bias),)
        elif router == "GShardTop2":
            policy = mr.GShardTop2(s.experts, capacity_factor=1.0)
            extra = (common.asarray(backend, rng.random(s.tokens, dtype=np.float32)),)
        elif router.startswith("TopK-BPR"):
            policy = mr.TopK(s.experts, s.k, capacity_factor=1.0, drop_policy="batch_priority")
        else:  # HashRouter: reads int32 ids, not logits
            policy = mr.HashRouter(s.experts, table=mr.random_hash_table(50_000, s.experts, seed=0))
        logits = rng.standard_normal((s.tokens, columns), dtype=np.float32)
        if router == "HashRouter":
            logits = rng.integers(0, 50_000, s.tokens).astype(np.int32)
            columns = 1  # one 4-byte id read per token
        self.logits = common.asarray(backend, logits)
        self.extra = extra
        self.policy = policy
        self.padded = router.endswith("padded-plan")
        rows = int(np.count_nonzero(common.to_numpy(self.route().expert_ids) >= 0))
        self.nbytes = common.router_bytes(s.tokens, columns, rows)

    def route(self) -> Any:
        routing = self.policy(self.logits, *self.extra)
        if self.padded:
            common.sync(mr.make_plan(routing, pad_to_capacity=True).order)
        return routing

    def time_route(self, shape: str, backend: str, router: str) -> None:
        common.sync(self.route().weights)

    def track_gb_per_s(self, shape: str, backend: str, router: str) -> float:
        seconds = common.median_seconds(lambda: self.route().weights)
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


class RoutersVsEager:
    """Each token-choice router against the eager top-k a user would write in the same framework
    (torch: softmax + topk + renorm; NumPy: softmax + argpartition; JAX: jax.nn.softmax +
    jax.lax.top_k, both under jit), issue 16's shapes. ``track_vs_eager`` is eager time / router
    time measured in one setup (> 1: the router is faster, with exact ties)."""

    params = (
        ["4096,8,2", "4096,64,8", "16384,64,8", "65536,64,8"],
        ["numpy", "torch", "jax"],
        ["TopK", "NullExperts", "DeepSeekTopK+bias", "GShardTop2"],
    )
    param_names = ("T,E,k", "backend", "router")
    number = 1
    repeat = (1, 5, 20.0)
    timeout = 300.0

    def setup(self, shape: str, backend: str, router: str) -> None:
        common.skip_unless_installed(backend)
        from moerouter import _bench

        tokens, experts, k = (int(part) for part in shape.split(","))
        rng = np.random.default_rng(0)
        policies = {
            name.split("(")[0]: (policy, columns)
            for name, policy, columns in _bench._router_policies(experts, k, rng)
        }
        policy, columns = policies[router]
        convert, self.sync, wrap = _bench._router_library(backend)
        self.logits = convert(rng.standard_normal((tokens, columns), dtype=np.float32))
        self.eager_logits = convert(rng.standard_normal((tokens, experts), dtype=np.float32))
        bias = (rng.standard_normal(experts) * 0.01).astype(np.float32)
        self.extra = (convert(bias),) if router == "DeepSeekTopK+bias" else ()
        self.route = wrap(policy)
        self.eager = _bench._eager_router(backend, k)[1]

    def time_route(self, shape: str, backend: str, router: str) -> None:
        self.sync(self.route(self.logits, *self.extra))

    def time_eager(self, shape: str, backend: str, router: str) -> None:
        self.sync(self.eager(self.eager_logits))

    def track_vs_eager(self, shape: str, backend: str, router: str) -> float:
        eager = common.median_seconds(lambda: self.sync(self.eager(self.eager_logits)))
        route = common.median_seconds(lambda: self.sync(self.route(self.logits, *self.extra)))
        return eager / route

    track_vs_eager.unit = "x"  # type: ignore[attr-defined]
