"""One call of every public array function of the core, and the policy registry, shared by
the reliability tests and ``contract/test_capabilities.py``.

``POLICIES`` holds one :class:`PolicyCase` per public policy class: its smallest constructor
arguments (``test_bad_input``), its token-wise calls (``test_devices``, ``test_zero_tokens``),
its settings builder for random ``-inf`` masks (``test_neg_inf``) and its batch past int32
indices (``test_index_bounds``), each with the reason where a test does not apply.
``EXAMPLES`` holds one :class:`Example` per policy class: how to build and call it, so that
``test_capabilities`` checks its declared capabilities. Adding a policy means one entry in each,
both in this file; every test above fails while a policy of ``mr.policies`` lacks one.

``CALLS`` maps a public name (``"losses.z_loss"``, ``"TopK[capacity]"`` for a variant) to a
function of an :class:`Inputs` factory and the token shape ``lead`` ((T,) or (G, S)); it returns
whatever the public function returns. ``test_devices`` runs every call on torch ``meta`` tensors,
``test_zero_tokens`` the token-wise ones (``TOKEN_WISE``: the policies' calls and
``FUNCTION_CALLS``) with no tokens. ``NOT_CALLED`` names the public names that build no array
of the caller's backend, with the reason; ``public_names`` lists every public name, so that a
new one without a call (or a reason) fails the coverage test.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

import moerouter as mr
from moerouter.testing import Backend

E = 4  # real experts
NULL = 2  # null experts of NullExperts
K = 2  # experts per token
D = 6  # features
CLASSES = 3  # classes of the method modules' classifiers


@dataclass
class Inputs:
    """Random inputs of one backend, from NumPy draws: ``convert`` puts a NumPy array there."""

    convert: Callable[[np.ndarray], Any]
    xp: Any
    device: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def floats(self, *shape: int) -> Any:
        return self.convert(self.rng.standard_normal(shape).astype(np.float32))

    def uniform(self, *shape: int) -> Any:
        return self.convert(self.rng.random(shape).astype(np.float32))

    def ints(self, low: int, high: int, *shape: int) -> Any:
        return self.convert(self.rng.integers(low, high, shape).astype(np.int32))

    def bools(self, *shape: int) -> Any:
        return self.convert(np.ones(shape, dtype=bool))


def _tokens(lead: tuple[int, ...]) -> int:
    return math.prod(lead)


def _logits(a: Inputs, lead: tuple[int, ...], columns: int = E) -> Any:
    return a.floats(*lead, columns)


def _routing(a: Inputs, lead: tuple[int, ...]) -> mr.Routing:
    return mr.TopK(E, K)(_logits(a, lead))


def _null_routing(a: Inputs, lead: tuple[int, ...]) -> mr.Routing:
    return mr.NullExperts(E, NULL, K)(_logits(a, lead, E + NULL))


def _expert_choice(a: Inputs, lead: tuple[int, ...]) -> mr.Routing:
    return mr.ExpertChoice(E, capacity_factor=2.0)(_logits(a, lead))


def _top_p(a: Inputs, lead: tuple[int, ...]) -> mr.Routing:
    return mr.TopP(E, 0.5, K)(_logits(a, lead))


def _relu(a: Inputs, lead: tuple[int, ...]) -> mr.Routing:
    return mr.ReLURouting(E, K)(_logits(a, lead))


def _causal_training(a: Inputs, lead: tuple[int, ...]) -> mr.Routing:
    return mr.CausalExpertChoice(E)(_logits(a, lead), training=True)


def _dispatch_combine(a: Inputs, routing: mr.Routing, pad: bool = False) -> tuple[Any, Any]:
    plan = mr.make_plan(routing, pad_to_capacity=pad)
    xe = mr.dispatch(a.floats(routing.num_tokens, D), plan)
    return xe, mr.combine(xe * 2.0, plan)


def _soft(a: Inputs, lead: tuple[int, ...]) -> tuple[Any, Any]:
    soft = mr.SoftMoE(E, 2)(_logits(a, lead, 2 * E))
    slots = mr.dispatch(a.floats(*lead, D), soft)
    return soft, slots, mr.combine(slots, soft)


def _host_trace() -> mr.traces.Trace:
    """A trace recorded from NumPy logits (recording copies to the host by design)."""
    router = mr.traces.traced(mr.TopK(E, K), layer=0)
    logits = np.random.default_rng(1).standard_normal((6, E)).astype(np.float32)
    with mr.traces.record(logits=True, probs=True) as recorder:
        router(logits)
    return recorder.trace


def _mask(a: Inputs, lead: tuple[int, ...]) -> Any:
    return a.bools(*lead)


def _statistics(a: Inputs) -> mr.merging.RoutingStatistics:
    logits = _logits(a, (8,))
    return mr.merging.collect_routing_statistics(mr.TopK(E, K)(logits), logits)


# --------------------------------------------------------------------------------------------
# The policy registry: one entry per public policy class, read by every reliability test.
# --------------------------------------------------------------------------------------------

Call = Callable[[Inputs, tuple[int, ...]], Any]
#: route(backend, logits): the policy applied to NumPy logits converted to ``backend``.
Route = Callable[[Backend, np.ndarray], Any]
#: builder(draw, experts) -> (logits columns, route): draws the policy's settings (hypothesis).
Builder = Callable[[Any, int], tuple[int, Route]]
#: route(experts, logits, tokens) of a batch too large for int32 indices (shapes only).
Huge = Callable[[int, Any, int], Any]


@dataclass(frozen=True)
class PolicyCase:
    """Everything the reliability tests call of one public policy class.

    Attributes
    ----------
    args : dict
        The smallest constructor arguments (``test_bad_input`` checks the type of every flag
        and count field from there).
    calls : dict
        Token-wise calls by variant (``""`` the plain call, ``"[capacity]"`` a variant), as
        ``call(inputs, lead)``: ``test_devices`` runs them on meta tensors, ``test_zero_tokens``
        with no tokens.
    neg_inf : Builder or str
        Draws the policy's settings for the random ``-inf`` masks of ``test_neg_inf``, or the
        reason no logit reaches the policy.
    huge : dict or str
        ``{variant: (layout, route)}`` for ``test_index_bounds``: a ``"token"`` route of
        ``2**30`` tokens with two assignments each, or an ``"expert"`` route of
        ``(8, 2**27, E)`` logits with capacity factor 2, both past int32 indices. A string
        gives the reason the policy has no such case.
    """

    args: dict[str, Any]
    calls: dict[str, Call]
    neg_inf: Builder | str
    huge: dict[str, tuple[str, Huge]] | str


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _draws(backend: Backend, shape: tuple[int, ...], seed: int) -> Any:
    return backend.asarray(np.random.default_rng(seed).random(shape).astype(np.float32))


def _plain(router: Any) -> Route:
    return lambda backend, logits: router(backend.asarray(logits))


def _with_noise(draw: Any, router: Any) -> Route:
    seed = draw(st.integers(0, 2**16)) if draw(st.booleans()) else None

    def route(backend: Backend, logits: np.ndarray) -> Any:
        if seed is None:
            return router(backend.asarray(logits))
        noise = np.random.default_rng(seed).standard_normal(logits.shape).astype(np.float32)
        return router(backend.asarray(logits), backend.asarray(noise))

    return route


def _neg_inf_topk(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.TopK(
        experts,
        draw(st.integers(1, experts)),
        score=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize=draw(st.booleans()),
        softmax_after_topk=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
        drop_policy=draw(st.sampled_from(["position", "probs", "batch_priority"])),
    )
    return experts, _plain(router)


def _neg_inf_null_experts(draw: Any, experts: int) -> tuple[int, Route]:
    num_null = draw(st.integers(1, 4))
    router = mr.NullExperts(
        experts,
        num_null,
        draw(st.integers(1, experts + num_null)),
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.5])),
    )
    return experts + num_null, _plain(router)


def _neg_inf_expert_choice(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.ExpertChoice(experts, capacity_factor=draw(st.sampled_from([0.5, 1.0, 2.0, 50.0])))
    return experts, _plain(router)


def _neg_inf_deepseek(draw: Any, experts: int) -> tuple[int, Route]:
    num_groups = draw(st.sampled_from(_divisors(experts)))
    topk_groups = draw(st.integers(1, num_groups))
    eligible = topk_groups * (experts // num_groups)
    router = mr.DeepSeekTopK(
        experts,
        draw(st.integers(1, eligible)),
        num_groups=num_groups,
        topk_groups=topk_groups,
        score=draw(st.sampled_from(["sigmoid", "softmax"])),
        capacity_factor=draw(st.sampled_from([None, 1.0])),
    )
    seed = draw(st.integers(0, 2**16))

    def route(backend: Backend, logits: np.ndarray) -> Any:
        bias = np.random.default_rng(seed).standard_normal(experts).astype(np.float32) * 0.1
        return router(backend.asarray(logits), backend.asarray(bias))

    return experts, route


def _neg_inf_gshard(draw: Any, experts: int) -> tuple[int, Route]:
    experts = max(experts, 2)  # top-2
    router = mr.GShardTop2(experts, capacity_factor=draw(st.sampled_from([None, 1.0])))
    seed = draw(st.integers(0, 2**16))

    def route(backend: Backend, logits: np.ndarray) -> Any:
        return router(backend.asarray(logits), _draws(backend, logits.shape[:-1], seed))

    return experts, route


def _neg_inf_locality(draw: Any, experts: int) -> tuple[int, Route]:
    num_nodes = draw(st.sampled_from(_divisors(experts)))
    max_nodes = draw(st.integers(1, num_nodes))
    router = mr.LocalityTopK(
        experts,
        draw(st.integers(1, max_nodes * (experts // num_nodes))),
        num_nodes=num_nodes,
        max_nodes=max_nodes,
        normalize=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 1.0])),
    )
    seed = draw(st.integers(0, 2**16))

    def route(backend: Backend, logits: np.ndarray) -> Any:
        tokens = math.prod(logits.shape[:-1])
        nodes = np.random.default_rng(seed).integers(0, num_nodes, tokens).astype(np.int32)
        return router(backend.asarray(logits), backend.asarray(nodes))

    return experts, route


def _neg_inf_affinity(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.AffinityRouting(experts, capacity_factor=draw(st.sampled_from([0.5, 1.0, 2.0])))
    use_affinity = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))

    def route(backend: Backend, logits: np.ndarray) -> Any:
        scores = _draws(backend, logits.shape, seed) if use_affinity else None
        return router(backend.asarray(logits), scores)

    return experts, route


def _neg_inf_anchor(draw: Any, experts: int) -> tuple[int, Route]:
    inner = draw(
        st.sampled_from([mr.TopK(experts, 1), mr.ExpertChoice(experts, capacity_factor=2.0)])
    )
    router = mr.AnchorRouting(inner, num_anchors=3)
    seed = draw(st.integers(0, 2**16))

    def route(backend: Backend, logits: np.ndarray) -> Any:
        tokens = math.prod(logits.shape[:-1])
        anchors = np.random.default_rng(seed).integers(0, 3, tokens).astype(np.int32)
        return router(backend.asarray(logits), backend.asarray(anchors))

    return experts, route


def _neg_inf_sinkhorn_token_choice(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.SinkhornTokenChoice(
        experts,
        k=draw(st.integers(1, experts)),
        normalize=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 1.0])),
    )
    return experts, _with_noise(draw, router)


def _neg_inf_sinkhorn_expert_choice(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.SinkhornExpertChoice(
        experts, capacity_factor=draw(st.sampled_from([0.5, 1.0, 50.0]))
    )
    return experts, _with_noise(draw, router)


def _neg_inf_balanced(draw: Any, experts: int) -> tuple[int, Route]:
    return experts, _plain(mr.BalancedAssignment(experts))


def _neg_inf_sparse_transport(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.SparsityConstrainedExpertChoice(
        experts, capacity_factor=draw(st.sampled_from([0.5, 1.0, 50.0]))
    )
    return experts, _plain(router)


def _neg_inf_soft_moe(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.SoftMoE(experts, slots_per_expert=draw(st.integers(1, 2)))
    return router.num_slots, _plain(router)


def _neg_inf_top_p(draw: Any, experts: int) -> tuple[int, Route]:
    router = mr.TopP(
        experts,
        p=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        max_k=draw(st.integers(1, experts)),
        normalize=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 1.0])),
    )
    return experts, _plain(router)


def _neg_inf_relu(draw: Any, experts: int) -> tuple[int, Route]:
    return experts, _plain(mr.ReLURouting(experts, max_k=draw(st.integers(1, experts))))


def _neg_inf_causal_expert_choice(draw: Any, experts: int) -> tuple[int, Route]:
    mode = draw(st.sampled_from(["training", "threshold", "predictor"]))
    router = mr.CausalExpertChoice(
        experts, mode="predictor" if mode == "predictor" else "threshold"
    )
    seed = draw(st.integers(0, 2**16))

    def route(backend: Backend, logits: np.ndarray) -> Any:
        if mode == "training":
            return router(backend.asarray(logits), training=True)
        rng = np.random.default_rng(seed)
        if mode == "threshold":  # thresholds in (0, 1), as a running C-th largest probability
            thresholds = rng.uniform(0.01, 0.99, experts).astype(np.float32)
            return router(backend.asarray(logits), backend.asarray(thresholds))
        # A predictor that says "route" everywhere: a -inf logit must still never be routed to.
        predictor = np.abs(rng.standard_normal(logits.shape)).astype(np.float32) + 1.0
        return router(backend.asarray(logits), predictor_logits=backend.asarray(predictor))

    return experts, route


def _huge_nodes(logits: Any, tokens: int) -> Any:
    """Zeros (tokens,) int32 without memory: a zero-stride view, or a meta tensor like logits."""
    if isinstance(logits, np.ndarray):
        return np.broadcast_to(np.zeros(1, np.int32), (tokens,))
    return logits.new_empty((tokens,), dtype=sys.modules["torch"].int32)


ONE_PER_TOKEN = "one assignment per token: T * 1 reaches 2**31 only with 2**31 tokens"

POLICIES: dict[str, PolicyCase] = {
    "TopK": PolicyCase(
        args={"num_experts": 4, "k": 2},
        calls={
            "": lambda a, lead: mr.TopK(E, K)(_logits(a, lead)),
            "[capacity, probs]": lambda a, lead: mr.TopK(
                E, K, capacity_factor=1.0, drop_policy="probs"
            )(_logits(a, lead)),
            "[sigmoid, batch_priority]": lambda a, lead: mr.TopK(
                E, K, score="sigmoid", capacity_factor=1.5, drop_policy="batch_priority"
            )(_logits(a, lead)),
        },
        neg_inf=_neg_inf_topk,
        huge={
            "": ("token", lambda e, logits, t: mr.TopK(e, 2)(logits)),
            "[capacity]": (
                "token",
                lambda e, logits, t: mr.TopK(e, 2, capacity_factor=1.0)(logits),
            ),
        },
    ),
    "NullExperts": PolicyCase(
        args={"num_experts": 4, "num_null": 2, "k": 2},
        calls={
            "": _null_routing,
            "[capacity]": lambda a, lead: mr.NullExperts(E, NULL, K, capacity_factor=1.0)(
                _logits(a, lead, E + NULL)
            ),
        },
        neg_inf=_neg_inf_null_experts,
        huge={"": ("token", lambda e, logits, t: mr.NullExperts(e - 2, 2, 2)(logits))},
    ),
    "ExpertChoice": PolicyCase(
        args={"num_experts": 4},
        calls={"": _expert_choice},
        neg_inf=_neg_inf_expert_choice,
        huge={"": ("expert", lambda e, logits, t: mr.ExpertChoice(e, capacity_factor=2.0)(logits))},
    ),
    "DeepSeekTopK": PolicyCase(
        args={"num_experts": 4, "k": 2, "num_groups": 2, "topk_groups": 1},
        calls={
            "": lambda a, lead: mr.DeepSeekTopK(E, K)(_logits(a, lead)),
            "[grouped, bias, capacity]": lambda a, lead: mr.DeepSeekTopK(
                E, K, num_groups=2, topk_groups=1, capacity_factor=1.0
            )(_logits(a, lead), a.floats(E)),
        },
        neg_inf=_neg_inf_deepseek,
        huge={
            "": (
                "token",
                lambda e, logits, t: mr.DeepSeekTopK(e, 2, num_groups=2, topk_groups=1)(logits),
            )
        },
    ),
    "GShardTop2": PolicyCase(
        args={"num_experts": 4},
        calls={
            "": lambda a, lead: mr.GShardTop2(E)(_logits(a, lead), a.uniform(*lead)),
            "[all, capacity]": lambda a, lead: mr.GShardTop2(
                E, second_expert_policy="all", capacity_factor=1.0
            )(_logits(a, lead)),
        },
        neg_inf=_neg_inf_gshard,
        huge={
            "": (
                "token",
                lambda e, logits, t: mr.GShardTop2(e, second_expert_policy="all")(logits),
            )
        },
    ),
    "SinkhornTokenChoice": PolicyCase(
        args={"num_experts": 4},
        calls={
            "[noise, capacity]": lambda a, lead: mr.SinkhornTokenChoice(
                E, K, capacity_factor=1.0, num_iters=3
            )(_logits(a, lead), a.floats(*lead, E)),
        },
        neg_inf=_neg_inf_sinkhorn_token_choice,
        huge={"": ("token", lambda e, logits, t: mr.SinkhornTokenChoice(e, 2)(logits))},
    ),
    "SinkhornExpertChoice": PolicyCase(
        args={"num_experts": 4},
        calls={
            "": lambda a, lead: mr.SinkhornExpertChoice(E, num_iters=3)(_logits(a, lead)),
        },
        neg_inf=_neg_inf_sinkhorn_expert_choice,
        huge={
            "": (
                "expert",
                lambda e, logits, t: mr.SinkhornExpertChoice(e, capacity_factor=2.0)(logits),
            )
        },
    ),
    "BalancedAssignment": PolicyCase(
        args={"num_experts": 4},
        calls={
            "": lambda a, lead: mr.BalancedAssignment(E, num_iters=3)(_logits(a, lead)),
        },
        neg_inf=_neg_inf_balanced,
        huge=ONE_PER_TOKEN,
    ),
    "SparsityConstrainedExpertChoice": PolicyCase(
        args={"num_experts": 4},
        calls={
            "": lambda a, lead: mr.SparsityConstrainedExpertChoice(E, num_steps=3)(
                _logits(a, lead)
            ),
            "[plan]": lambda a, lead: mr.SparsityConstrainedExpertChoice(E, num_steps=3).plan(
                _logits(a, lead)
            ),
        },
        neg_inf=_neg_inf_sparse_transport,
        huge={
            "": (
                "expert",
                lambda e, logits, t: mr.SparsityConstrainedExpertChoice(e, capacity_factor=2.0)(
                    logits
                ),
            )
        },
    ),
    "SoftMoE": PolicyCase(
        args={"num_experts": 4},
        calls={"": _soft},
        neg_inf=_neg_inf_soft_moe,
        huge="soft routing: dense (T, slots) weights, no int32 indices",
    ),
    "TopP": PolicyCase(
        args={"num_experts": 4, "p": 0.5, "max_k": 2},
        calls={
            "": _top_p,
            "[capacity, normalize]": lambda a, lead: mr.TopP(
                E, 0.5, K, normalize=True, capacity_factor=1.0
            )(_logits(a, lead)),
        },
        neg_inf=_neg_inf_top_p,
        huge={"": ("token", lambda e, logits, t: mr.TopP(e, 0.5, 2)(logits))},
    ),
    "ReLURouting": PolicyCase(
        args={"num_experts": 4, "max_k": 2},
        calls={"": _relu},
        neg_inf=_neg_inf_relu,
        huge={"": ("token", lambda e, logits, t: mr.ReLURouting(e, 2)(logits))},
    ),
    "CausalExpertChoice": PolicyCase(
        args={"num_experts": 4},
        calls={
            "[training]": _causal_training,
            "[threshold]": lambda a, lead: mr.CausalExpertChoice(E)(_logits(a, lead), a.floats(E)),
            "[predictor]": lambda a, lead: mr.CausalExpertChoice(E, mode="predictor")(
                _logits(a, lead), predictor_logits=a.floats(*lead, E)
            ),
        },
        neg_inf=_neg_inf_causal_expert_choice,
        huge={
            "[training]": (
                "expert",
                lambda e, logits, t: mr.CausalExpertChoice(e, capacity_factor=2.0)(
                    logits, training=True
                ),
            )
        },
    ),
    "HashRouter": PolicyCase(
        args={"num_experts": 4},
        calls={
            "": lambda a, lead: mr.HashRouter(E)(a.ints(-1, 50, *lead)),
            "[table]": lambda a, lead: mr.HashRouter(E, table=[[0, 1], [2, 3], [1, 2]])(
                a.ints(-1, 4, *lead)
            ),
        },
        neg_inf="routes token ids through a fixed table",
        huge="routes token ids: test_hash_router_past_int32_raises_on_meta",
    ),
    "FrozenRandomRouter": PolicyCase(
        args={"d_model": 8, "num_experts": 4, "seed": 0},
        calls={"": lambda a, lead: mr.FrozenRandomRouter(D, E, seed=0)(a.floats(*lead, D))},
        neg_inf="a gate: it produces logits, it does not route them",
        huge="a gate: it produces logits, it does not route them",
    ),
    "LocalityTopK": PolicyCase(
        args={"num_experts": 4, "k": 1, "num_nodes": 2},
        calls={
            "": lambda a, lead: mr.policies.LocalityTopK(
                E, K, num_nodes=2, max_nodes=2, capacity_factor=1.0
            )(_logits(a, lead), a.ints(0, 2, _tokens(lead))),
        },
        neg_inf=_neg_inf_locality,
        huge={
            "": (
                "token",
                lambda e, logits, t: mr.policies.LocalityTopK(e, 2, num_nodes=2)(
                    logits, _huge_nodes(logits, t)
                ),
            )
        },
    ),
    "AffinityRouting": PolicyCase(
        args={"num_experts": 4, "capacity_factor": 1.0},
        calls={
            "": lambda a, lead: mr.policies.AffinityRouting(E, capacity_factor=1.0)(
                _logits(a, lead), a.floats(*lead, E)
            ),
        },
        neg_inf=_neg_inf_affinity,
        huge=ONE_PER_TOKEN,
    ),
    "AnchorRouting": PolicyCase(
        args={"policy": mr.TopK(4, 1), "num_anchors": 2},
        calls={
            "": lambda a, lead: mr.AnchorRouting(mr.TopK(E, K), num_anchors=3)(
                _logits(a, lead), a.ints(-1, 3, _tokens(lead))
            ),
        },
        neg_inf=_neg_inf_anchor,
        # Its anchor means are computed before the inner policy checks: a huge batch would
        # allocate them, so there is no shapes-only case (a known gap).
        huge="known gap: averages the logits per anchor before its inner policy checks sizes",
    ),
}


# --------------------------------------------------------------------------------------------
# How test_capabilities builds and calls each policy


@dataclass(frozen=True)
class Example:
    """How to build and call one policy on small inputs."""

    make: Callable[..., Any]  # make(**field_overrides) -> policy
    columns: int | None = E  # logits columns E'; None: the policy reads token ids
    # Inputs after the logits, in call order: name -> (rng, G, S) -> NumPy array.
    extra: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = field(
        default_factory=dict
    )
    # The policy with every token limited to one group of experts, and the number of groups.
    one_group: Callable[[], Any] | None = None
    expert_blocks: int = 1
    # How test_capacity calls the policy (CausalExpertChoice: its training rule has the capacity).
    capacity_call: Callable[[Any, list[np.ndarray]], Any] = lambda policy, arrays: policy(*arrays)


def tokens_on(blocks):
    return lambda rng, g, s: (np.arange(g * s) % blocks).astype(np.int32)


EXAMPLES: dict[type, Example] = {
    mr.TopK: Example(lambda **kw: mr.TopK(E, 2, **kw)),
    mr.TopP: Example(lambda **kw: mr.TopP(E, p=0.6, max_k=2, **kw)),
    mr.ReLURouting: Example(lambda **kw: mr.ReLURouting(E, max_k=3, **kw)),
    mr.CausalExpertChoice: Example(
        lambda **kw: mr.CausalExpertChoice(E, **kw),
        extra={"thresholds": lambda rng, g, s: rng.uniform(0.1, 0.4, E).astype(np.float32)},
        capacity_call=lambda policy, arrays: policy(arrays[0], training=True),
    ),
    mr.NullExperts: Example(lambda **kw: mr.NullExperts(E, 3, 2, **kw), columns=E + 3),
    mr.ExpertChoice: Example(lambda **kw: mr.ExpertChoice(E, **kw)),
    mr.SinkhornTokenChoice: Example(lambda **kw: mr.SinkhornTokenChoice(E, k=2, num_iters=3, **kw)),
    mr.SinkhornExpertChoice: Example(lambda **kw: mr.SinkhornExpertChoice(E, num_iters=3, **kw)),
    mr.BalancedAssignment: Example(lambda **kw: mr.BalancedAssignment(E, num_iters=20, **kw)),
    mr.SparsityConstrainedExpertChoice: Example(
        lambda **kw: mr.SparsityConstrainedExpertChoice(E, num_steps=3, **kw)
    ),
    mr.SoftMoE: Example(lambda **kw: mr.SoftMoE(E, slots_per_expert=2, **kw), columns=2 * E),
    mr.DeepSeekTopK: Example(
        lambda **kw: mr.DeepSeekTopK(E, 2, **kw),
        extra={"bias": lambda rng, g, s: (0.1 * rng.standard_normal(E)).astype(np.float32)},
        one_group=lambda: mr.DeepSeekTopK(E, 2, num_groups=2, topk_groups=1),
        expert_blocks=2,
    ),
    mr.GShardTop2: Example(
        lambda **kw: mr.GShardTop2(E, **kw),
        extra={"uniform": lambda rng, g, s: rng.random((g, s), dtype=np.float32)},
    ),
    mr.HashRouter: Example(lambda **kw: mr.HashRouter(E, **kw), columns=None),
    mr.LocalityTopK: Example(
        lambda **kw: mr.LocalityTopK(E, 2, num_nodes=2, max_nodes=2, **kw),
        extra={"token_nodes": tokens_on(2)},
        one_group=lambda: mr.LocalityTopK(E, 1, num_nodes=2, max_nodes=1),
        expert_blocks=2,
    ),
    mr.AffinityRouting: Example(
        lambda **kw: mr.AffinityRouting(E, **{"capacity_factor": 1.0, **kw}),
        extra={"affinity": lambda rng, g, s: rng.random((g, s, E), dtype=np.float32)},
    ),
    mr.AnchorRouting: Example(
        lambda **kw: mr.AnchorRouting(mr.TopK(E, 1), num_anchors=3, **kw),
        extra={"anchor_ids": tokens_on(3)},
    ),
}


def public_policies() -> set[str]:
    """The public policy classes: the dataclasses of ``mr.policies`` (their state types are
    NamedTuples and route nothing)."""
    return {n for n in mr.policies.__all__ if is_dataclass(getattr(mr.policies, n))}


# Public functions (not policies) -> call; token-wise ones route or score ``lead`` tokens.
FUNCTION_CALLS: dict[str, Call] = {
    # ---- policy helpers, gates and losses of routings
    "policies.expert_choice_targets": lambda a, lead: mr.policies.expert_choice_targets(
        _causal_training(a, lead)
    ),
    "losses.dynamic_loss": lambda a, lead: mr.losses.dynamic_loss(
        _top_p(a, lead), mask=_mask(a, lead)
    ),
    "losses.routed_load_balancing": lambda a, lead: mr.losses.routed_load_balancing(
        _top_p(a, lead), mask=_mask(a, lead)
    ),
    "losses.relu_l1_loss": lambda a, lead: [
        mr.losses.relu_l1_loss(_relu(a, lead), mask=_mask(a, lead)),
        mr.losses.relu_l1_loss(_relu(a, lead), target_k=1),
    ],
    "losses.relu_sparsity": lambda a, lead: mr.losses.relu_sparsity(_relu(a, lead)),
    "losses.relu_cut_fraction": lambda a, lead: mr.losses.relu_cut_fraction(_relu(a, lead)),
    "losses.causal_predictor_loss": lambda a, lead: mr.losses.causal_predictor_loss(
        a.floats(*lead, E), _causal_training(a, lead), mask=_mask(a, lead)
    ),
    "policies.affinity_scores": lambda a, lead: mr.policies.affinity_scores(
        a.floats(_tokens(lead), D), a.floats(E, D)
    ),
    "policies.anchor_mean_logits": lambda a, lead: mr.policies.anchor_mean_logits(
        _logits(a, lead), a.ints(-1, 3, _tokens(lead)), num_anchors=3
    ),
    "policies.anchor_router_input": lambda a, lead: mr.policies.anchor_router_input(
        a.floats(_tokens(lead), D), a.ints(-1, 3, _tokens(lead)), a.floats(3, 2)
    ),
    "cosine_router_logits": lambda a, lead: mr.cosine_router_logits(
        a.floats(*lead, D), a.floats(D, E), a.floats(1)
    ),
    "gaussian_noise": lambda a, lead: mr.gaussian_noise(
        _logits(a, lead), a.floats(*lead, E), a.uniform(*lead, E)
    ),
    "multiplicative_jitter": lambda a, lead: mr.multiplicative_jitter(
        _logits(a, lead), a.uniform(*lead, E)
    ),
    "noisy_top_k_std": lambda a, lead: mr.noisy_top_k_std(_logits(a, lead)),
    "vmoe_logit_noise": lambda a, lead: mr.vmoe_logit_noise(_logits(a, lead), a.floats(*lead, E)),
    "policies.grouped_average_pooling": lambda a, lead: mr.policies.grouped_average_pooling(
        a.floats(*lead, 2 * E), E
    ),
    "policies.locality_loss": lambda a, lead: mr.policies.locality_loss(
        _routing(a, lead), a.ints(0, 2, _tokens(lead)), num_nodes=2
    ),
    # The same function as policies.locality_loss, at its home in mr.losses.
    "losses.locality_loss": lambda a, lead: mr.losses.locality_loss(
        _routing(a, lead), a.ints(0, 2, _tokens(lead)), num_nodes=2
    ),
    "policies.sinkhorn_plan": lambda a, lead: mr.policies.sinkhorn_plan(
        _logits(a, lead), num_iters=3
    ),
    # ---- plan, dispatch, combine
    "make_plan": lambda a, lead: mr.make_plan(_routing(a, lead)),
    "make_plan[expert layout]": lambda a, lead: mr.make_plan(_expert_choice(a, lead)),
    "make_plan[pad_to_capacity]": lambda a, lead: mr.make_plan(
        mr.TopK(E, K, capacity_factor=1.0)(_logits(a, lead)), pad_to_capacity=True
    ),
    "dispatch": lambda a, lead: _dispatch_combine(a, _routing(a, lead))[0],
    "combine": lambda a, lead: _dispatch_combine(a, _routing(a, lead))[1],
    "combine[null experts]": lambda a, lead: _dispatch_combine(a, _null_routing(a, lead)),
    "combine[expert layout]": lambda a, lead: _dispatch_combine(a, _expert_choice(a, lead)),
    "combine[pad_to_capacity]": lambda a, lead: _dispatch_combine(
        a, mr.ExpertChoice(E)(_logits(a, lead)), pad=True
    ),
    # ---- losses
    "losses.load_balancing": lambda a, lead: [
        mr.losses.load_balancing(_routing(a, lead), convention=convention, mask=_mask(a, lead))
        for convention in ("megatron", "mixtral", "gshard")
    ],
    "losses.load_balancing[expert layout]": lambda a, lead: mr.losses.load_balancing(
        _expert_choice(a, lead), convention="gshard"
    ),
    "losses.null_load_balancing": lambda a, lead: [
        mr.losses.null_load_balancing(_null_routing(a, lead), null_mode=mode)
        for mode in ("pooled", "per_expert")
    ],
    "losses.sequence_load_balancing": lambda a, lead: mr.losses.sequence_load_balancing(
        _routing(a, lead), alpha=0.5, mask=_mask(a, lead)
    ),
    "losses.importance_loss": lambda a, lead: [
        mr.losses.importance_loss(_routing(a, lead), source=source)
        for source in ("weights", "probs")
    ],
    "losses.load_loss": lambda a, lead: [
        mr.losses.load_loss(
            _logits(a, lead), _logits(a, lead), a.uniform(*lead, E), k=K, threshold=threshold
        )
        for threshold in ("shazeer", "vmoe")
    ],
    "losses.load_loss[float std]": lambda a, lead: mr.losses.load_loss(
        _logits(a, lead), _logits(a, lead), 0.5, k=1, mask=_mask(a, lead)
    ),
    "losses.entropy": lambda a, lead: mr.losses.entropy(_routing(a, lead), mask=_mask(a, lead)),
    "losses.z_loss": lambda a, lead: mr.losses.z_loss(_logits(a, lead), mask=_mask(a, lead)),
    "losses.aggregate": lambda a, lead: mr.losses.aggregate(
        [
            {
                "z": mr.losses.z_loss(_logits(a, lead)),
                "lb": mr.losses.load_balancing(_routing(a, lead)),
            }
            for _ in range(2)
        ],
        weights=[1.0, 3.0],
    ),
    "losses.balance_state_init": lambda a, lead: mr.losses.balance_state_init(
        E, xp=a.xp, device=a.device
    ),
    "losses.accumulate": lambda a, lead: mr.losses.accumulate(
        mr.losses.balance_state_init(E, xp=a.xp, device=a.device), _routing(a, lead)
    ),
    "losses.moe_state_init": lambda a, lead: mr.losses.moe_state_init(
        E, E + 2, xp=a.xp, device=a.device
    ),
    "losses.moe_state_update": lambda a, lead: mr.losses.moe_state_update(
        mr.losses.moe_state_init(E, xp=a.xp, device=a.device),
        _routing(a, lead),
        bias_update_rate=0.1,
    ),
    "losses.load_balancing_from_state": lambda a, lead: [
        mr.losses.load_balancing_from_state(
            mr.losses.accumulate(
                mr.losses.balance_state_init(E, xp=a.xp, device=a.device), _routing(a, lead)
            ),
            convention=convention,
            routing=routing,
        )
        for convention in ("megatron", "mixtral")
        for routing in (None, _routing(a, lead))
    ],
    # ---- stats
    "stats.summary": lambda a, lead: [
        mr.stats.summary(routing)
        for routing in (_routing(a, lead), _null_routing(a, lead), _expert_choice(a, lead))
    ],
    "stats.co_occurrence": lambda a, lead: mr.stats.co_occurrence(
        _routing(a, lead), mask=_mask(a, lead)
    ),
    "stats.processed_by_at_least": lambda a, lead: [
        mr.stats.processed_by_at_least(_expert_choice(a, lead)),
        mr.stats.processed_by_at_least(_routing(a, lead), thresholds=[0, 2], mask=_mask(a, lead)),
    ],
}

# Calls of functions that are not token-wise (expert tables, per-row method diagnostics).
OTHER: dict[str, Call] = {
    # ---- adaptive-policy state: init on the caller's device, update from a routing
    "policies.relu_state_init": lambda a, lead: mr.policies.relu_state_init(
        xp=a.xp, device=a.device
    ),
    "policies.update_l1_coefficient": lambda a, lead: mr.policies.update_l1_coefficient(
        mr.policies.relu_state_init(xp=a.xp, device=a.device),
        mr.losses.relu_sparsity(_relu(a, (6,))),
        target_sparsity=0.5,
    ),
    "policies.threshold_state_init": lambda a, lead: mr.policies.threshold_state_init(
        E, xp=a.xp, device=a.device
    ),
    "policies.update_thresholds": lambda a, lead: mr.policies.update_thresholds(
        mr.policies.threshold_state_init(E, xp=a.xp, device=a.device), _causal_training(a, (6,))
    ),
    # ---- AdaMoE conversion of a gate weight
    "adamoe.tile_null_rows": lambda a, lead: mr.adamoe.tile_null_rows(a.floats(E, D), E),
    "adamoe.drop_null_rows": lambda a, lead: mr.adamoe.drop_null_rows(a.floats(2 * E, D), E),
    "update_expert_bias": lambda a, lead: [
        mr.update_expert_bias(a.floats(E), a.ints(0, 9, E), 0.1),
        mr.update_expert_bias(
            mr.expert_bias_init(E, xp=a.xp, device=a.device), a.ints(0, 9, E), 0.1
        ),
    ],
    "expert_bias_init": lambda a, lead: mr.expert_bias_init(
        E, num_layers=2, xp=a.xp, device=a.device
    ),
    # ---- multitask
    "multitask.expert_collapse": lambda a, lead: mr.multitask.expert_collapse(a.floats(5, E, D)),
    "multitask.expert_degradation": lambda a, lead: mr.multitask.expert_degradation(
        a.uniform(5, 2, E)
    ),
    "multitask.expert_normalization": lambda a, lead: [
        mr.multitask.expert_normalization(a.floats(5, E, D)),
        mr.multitask.expert_normalization(
            a.floats(5, D), mean=a.floats(D), variance=a.uniform(D), scale=a.floats(D)
        ),
    ],
    "multitask.expert_underfitting": lambda a, lead: mr.multitask.expert_underfitting(
        a.uniform(5, 2, E), a.bools(2, E)
    ),
    "multitask.feature_gate": lambda a, lead: mr.multitask.feature_gate(
        a.floats(5, D), a.floats(E, D, 2), a.floats(E, 2, D)
    ),
    "multitask.mix": lambda a, lead: mr.multitask.mix(a.uniform(5, 2, E), a.floats(5, E, D)),
    "multitask.multi_gate": lambda a, lead: [
        mr.multitask.multi_gate(a.floats(5, 2, E)),
        mr.multitask.multi_gate(a.floats(5, 2, E), a.bools(2, E), single_expert="sigmoid"),
    ],
    "multitask.self_gate": lambda a, lead: mr.multitask.self_gate(
        a.floats(5, E, D), a.floats(5, E), residual=a.floats(5, D)
    ),
    # ---- confidence
    "confidence.dispersion": lambda a, lead: mr.confidence.dispersion(a.floats(5, CLASSES)),
    "confidence.mixed_logits_loss": lambda a, lead: mr.confidence.mixed_logits_loss(
        a.floats(5, CLASSES), a.floats(5, CLASSES), a.ints(0, CLASSES, 5), a.uniform(5)
    ),
    "confidence.mlp_confidence": lambda a, lead: mr.confidence.mlp_confidence(
        a.floats(5, CLASSES),
        [(a.floats(2 + 3, 4), a.floats(4)), (a.floats(4, 1), a.floats(1))],
        node_features=a.floats(5, 3),
    ),
    "confidence.power_confidence": lambda a, lead: [
        mr.confidence.power_confidence(a.floats(5, CLASSES), 2.0, measure=measure)
        for measure in ("variance", "entropy")
    ],
    "confidence.predict": lambda a, lead: [
        mr.confidence.predict(
            a.floats(5, CLASSES), a.floats(5, CLASSES), a.uniform(5), uniform=a.uniform(5)
        ),
        mr.confidence.predict(
            a.floats(5, CLASSES), a.floats(5, CLASSES), a.uniform(5), threshold=0.5
        ),
    ],
    "confidence.predict_mixed": lambda a, lead: mr.confidence.predict_mixed(
        a.floats(5, CLASSES), a.floats(5, CLASSES), a.uniform(5)
    ),
    "confidence.weighted_loss": lambda a, lead: mr.confidence.weighted_loss(
        a.floats(5, CLASSES), a.floats(5, CLASSES), a.ints(0, CLASSES, 5), a.uniform(5)
    ),
    # ---- ensemble
    "ensemble.average_parameters": lambda a, lead: mr.ensemble.average_parameters(
        [{"w": a.floats(3, 2), "b": [a.floats(2)]} for _ in range(3)], [0.5, 0.25, 0.25]
    ),
    "ensemble.domain_posterior": lambda a, lead: [
        mr.ensemble.domain_posterior(a.floats(5, 3), a.uniform(3), window=window)
        for window in (1, None)
    ],
    "ensemble.ensemble_log_likelihood": lambda a, lead: mr.ensemble.ensemble_log_likelihood(
        a.floats(5, 3), a.uniform(3)
    ),
    "ensemble.top_k_prior": lambda a, lead: mr.ensemble.top_k_prior(a.uniform(3), 2),
    "ensemble.update_prior": lambda a, lead: mr.ensemble.update_prior(
        a.uniform(3), a.uniform(4, 3), alpha=0.5
    ),
    # ---- merging
    "merging.collect_routing_statistics": lambda a, lead: [
        _statistics(a),
        mr.merging.collect_routing_statistics(
            mr.TopK(E, K)(_logits(a, (8,))), state=_statistics(a), count="top1"
        ),
    ],
    "merging.routing_statistics_init": lambda a, lead: mr.merging.routing_statistics_init(
        E, xp=a.xp, device=a.device
    ),
    "merging.expert_frequencies": lambda a, lead: mr.merging.expert_frequencies(_statistics(a)),
    "merging.expert_similarity": lambda a, lead: mr.merging.expert_similarity(_statistics(a)),
    "merging.group_experts": lambda a, lead: mr.merging.group_experts(
        a.uniform(E), a.uniform(E, E), 2
    ),
    "merging.low_rank_factors": lambda a, lead: mr.merging.low_rank_factors(a.floats(2, 5, 3), 2),
    "merging.merge_experts": lambda a, lead: mr.merging.merge_experts(
        {"w": a.floats(E, 3, 2)}, a.ints(0, 2, E), a.uniform(E), num_groups=2
    ),
    "merging.merge_gate_rows": lambda a, lead: mr.merging.merge_gate_rows(
        a.floats(E, D), a.ints(0, 2, E), a.uniform(E), num_groups=2
    ),
    "merging.remap_routing": lambda a, lead: mr.merging.remap_routing(
        _null_routing(a, (5,)), a.ints(0, 2, E), num_groups=2
    ),
    # ---- workloads: logits generated from a seed, on the backend and device of ``like``
    **{
        f"workloads.{name}": (
            lambda a, lead, name=name: getattr(mr.workloads, name)(16, E, like=a.floats(1))
        )
        for name in ("uniform", "zipf", "bursty", "token_correlated", "hot_spikes")
    },
    "workloads.from_spec": lambda a, lead: mr.workloads.from_spec("zipf:1.4")(
        16, E, like=a.floats(1)
    ),
    # ---- traces: a host-recorded trace replayed onto the caller's device
    "traces.replay": lambda a, lead: [
        list(mr.traces.replay(_host_trace(), like=a.floats(1))),
        list(mr.traces.replay(_host_trace(), mr.TopK(E, 1), like=a.floats(1))),
    ],
    # ---- distillation
    "distillation.align_gradients": lambda a, lead: mr.distillation.align_gradients(a.floats(3, 7)),
    "distillation.binary_kl": lambda a, lead: mr.distillation.binary_kl(
        a.floats(5, CLASSES), a.floats(5, CLASSES)
    ),
    "distillation.binary_kl_norm": lambda a, lead: mr.distillation.binary_kl_norm(
        a.floats(5, CLASSES), a.floats(5, CLASSES)
    ),
    "distillation.cross_entropy": lambda a, lead: mr.distillation.cross_entropy(
        a.floats(5, CLASSES), a.ints(0, CLASSES, 5)
    ),
    "distillation.dual_head_loss": lambda a, lead: mr.distillation.dual_head_loss(
        a.floats(5, CLASSES), a.floats(5, CLASSES), a.floats(5, CLASSES), a.ints(0, CLASSES, 5)
    ),
}

# Public name (or "name[variant]") -> call. Token-wise calls route or score ``lead`` tokens.
TOKEN_WISE: dict[str, Call] = {
    f"{name}{variant}": call
    for name, case in POLICIES.items()
    for variant, call in case.calls.items()
} | FUNCTION_CALLS

CALLS = {**TOKEN_WISE, **OTHER}

#: Public names whose own output holds no array of the caller's backend, with the reason.
NOT_CALLED: dict[str, str] = {
    "policies.ReLURoutingState": "a data type; relu_state_init builds one (called)",
    "policies.ThresholdState": "a data type; threshold_state_init builds one (called)",
    "adamoe.null_router": "builds a policy from a policy: no arrays",
    "adamoe.top_k_router": "builds a policy from a policy: no arrays",
    "adamoe.exact_k_range": "integer arithmetic on Python ints",
    "Plan": "a data type; plans come from make_plan (called)",
    "Routing": "a data type; every policy builds one (called)",
    "SoftRouting": "a data type; SoftMoE builds one (called)",
    "BackendInfo": "a plugin declaration, no arrays",
    "losses.BalanceState": "a data type; balance_state_init builds one (called)",
    "losses.MoEState": "a data type; moe_state_init builds one (called)",
    "ExpertBiasState": "a data type; expert_bias_init builds one (called)",
    "merging.RoutingStatistics": "a data type; collect_routing_statistics builds one (called)",
    "k_schedule": "returns a Python int",
    "evaluate_at_k": "calls the user's function with Python ints",
    "random_hash_table": "a NumPy table made once on the host; HashRouter copies it (called)",
    "balanced_hash_table": "a NumPy table made once on the host; HashRouter copies it (called)",
    # Host algorithms: they read the values (test_devices checks their clear error on meta).
    "ensemble.branch_parameters": "host-side: picks domains from the posterior's values",
    "merging.num_groups_per_layer": "host-side: returns Python ints from the frequencies",
    "merging.weight_matching_permutation": "host-side: a linear assignment on the weights",
    "merging.align_experts": "host-side: weight matching, then a gather on the device",
    "multitask.hierarchy_mask": "host-side: builds the masks from the categories' values",
    "traces.to_numpy": "host-side: the host copy every recording makes",
    "KernelSet": "a plugin declaration, no arrays",
    "workloads.WORKLOADS": "the table of the workload functions (each called)",
    # Recording and simulation work on host NumPy copies by design (replay goes back to a device).
    **{
        f"traces.{name}": "recording: host NumPy records (replay, called, returns to a device)"
        for name in mr.traces.__all__
        if name not in ("replay", "to_numpy")
    },
    **{f"simulate.{name}": "the simulator runs on host NumPy" for name in mr.simulate.__all__},
}

_MODULES = ("policies", "losses", "stats", "multitask", "confidence", "ensemble", "merging")
_MODULES += ("distillation", "workloads", "traces", "simulate", "adamoe")


def public_names() -> set[str]:
    """Every public name of moerouter and its submodules, as ``CALLS`` and ``NOT_CALLED`` name
    them (top-level names bare, submodule names as ``module.name``)."""
    # mr.gates and mr.methods only regroup names checked under their other public paths
    # (mr.X and mr.policies.X for the gates, mr.multitask ... for the methods).
    namespaces = (*_MODULES, "gates", "methods", "__version__")
    names = {name for name in mr.__all__ if name not in namespaces}
    for module_name in _MODULES:
        module = getattr(mr, module_name)
        for name in module.__all__:
            if module_name == "policies" and name in names:
                continue  # re-exported at the top level
            names.add(f"{module_name}.{name}")
    return names


def called_names() -> set[str]:
    """The public names ``CALLS`` exercises (a variant ``name[...]`` counts for ``name``)."""
    return {key.partition("[")[0] for key in CALLS}


def leaves(value: Any) -> list[Any]:
    """Every array (any non-container value) inside ``value``, depth first, in order."""
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in leaves(item)]
    if is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in fields(value) for leaf in leaves(getattr(value, f.name))]
    if value is None or isinstance(value, bool | int | float | str):
        return []
    return [value]
