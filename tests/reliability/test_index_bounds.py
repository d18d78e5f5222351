"""Failure model: int32 indices that wrap around.

Indices are int32 by contract. A batch whose assignments reach ``2**31`` (``T * k`` in the
token layout, ``G * E * C`` in the expert layout, the rows of a plan) would make an int32
``arange`` wrap to negative values: half the assignments would get negative ``combine_rows`` and
``combine`` would skip them, a silently wrong output. Every such size must be refused with a
ValueError that names the sizes, from static shapes, before any array is built, on every backend.

The shapes are far too large to allocate here, and need not be: the checks read shapes only.
PyTorch runs them on ``meta`` tensors (shapes, no data), JAX under ``jax.eval_shape`` (abstract
arrays), NumPy on zero-stride ``broadcast_to`` views (one element of memory), with the policies'
first array (``clean_logits``) made an error, so a check that came too late fails cleanly instead
of allocating gigabytes. The boundary is exact: ``2**31 - 1`` assignments route, ``2**31`` raise.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from public_calls import POLICIES, public_policies

import moerouter as mr
from moerouter.testing import use_backend

INDEX_LIMIT = 2**31 - 1  # int32 indices: the largest count and the largest index + 1

E = 8
TOO_MANY = 2**30  # tokens: with k = 2, T * k = 2**31 assignments


# From the policy registry: token-layout routes (2**30 tokens, two assignments each), expert-layout
# routes ((8, 2**27, E) logits, capacity factor 2).
def _huge(layout: str) -> dict:
    return {
        f"{name}{variant}": route
        for name, case in POLICIES.items()
        if not isinstance(case.huge, str)
        for variant, (kind, route) in case.huge.items()
        if kind == layout
    }


TOKEN_LAYOUT = _huge("token")
EXPERT_LAYOUT = _huge("expert")


def test_every_policy_has_a_case_or_a_reason():
    # The registry holds every policy; each has a huge case here or a reason it has none.
    assert public_policies() == set(POLICIES)
    assert all(case.huge for case in POLICIES.values())


def _numpy_logits(*shape):
    """float32 logits of ``shape`` in one element of memory (a zero-stride view)."""
    return np.broadcast_to(np.zeros((1,) * len(shape), np.float32), shape)


class WouldBuild(Exception):
    """Raised instead of the policy's first array: its float32 copy of the logits."""


@pytest.fixture
def nothing_built(monkeypatch):
    """Make reaching ``clean_logits`` an error: the bound must be checked before it.

    Without this a missing check would copy the zero-stride NumPy view to 8 GiB or more.
    """

    def refuse(*args, **kwargs):
        raise WouldBuild("clean_logits reached: the int32 bound was not checked first")

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("moerouter.policies") and hasattr(
            module, "clean_logits"
        ):
            monkeypatch.setattr(module, "clean_logits", refuse)


def _call(name, logits, tokens):
    return TOKEN_LAYOUT[name](E, logits, tokens)


@pytest.fixture
def torch():
    """torch, once small calls on meta tensors are seen to stay on meta.

    The meta tests below route billions of tokens; an array that slipped to the CPU would
    allocate gigabytes there, so a device slip must fail here first.
    """
    torch = pytest.importorskip("torch")
    small = {name: _call(name, torch.empty(4, E, device="meta"), 4) for name in TOKEN_LAYOUT}
    small["ExpertChoice"] = mr.ExpertChoice(E)(torch.empty(4, E, device="meta"))
    small["buckets"] = mr.TopK(255, 1, capacity_factor=1.0)(torch.empty(4, 1, 255, device="meta"))
    plans = [mr.make_plan(small["TopK[capacity]"], pad_to_capacity=True)]
    plans.append(mr.make_plan(small["TopK"]))
    for array in [leaf for value in [*small.values(), *plans] for leaf in vars(value).values()]:
        if hasattr(array, "device"):
            assert array.device.type == "meta", "a routing of meta logits built a CPU array"
    return torch


@pytest.mark.parametrize("name", sorted(TOKEN_LAYOUT))
def test_token_layout_past_int32_raises_naming_t_and_k_on_numpy(name, nothing_built):
    logits = _numpy_logits(TOO_MANY, E)
    with pytest.raises(ValueError, match=r"T \* k = 1073741824 \* 2 = 2147483648 assignments"):
        _call(name, logits, TOO_MANY)


@pytest.mark.parametrize("name", sorted(EXPERT_LAYOUT))
def test_expert_layout_past_int32_raises_naming_g_e_c_on_numpy(name, nothing_built):
    # 8 groups of 2**27 tokens (T = 2**30 fits), C = 2 * 2**27 / 8 = 2**25 tokens per expert:
    # G * E * C = 8 * 8 * 2**25 = 2**31 expert slots do not (a capacity factor of 2 doubles R).
    logits = _numpy_logits(8, 2**27, E)
    with pytest.raises(ValueError, match=r"G \* E \* C = 8 \* 8 \* 33554432 = 2147483648 expert"):
        EXPERT_LAYOUT[name](E, logits, 2**30)


def test_hash_router_past_int32_raises_on_meta(torch):
    ids = torch.empty(TOO_MANY, dtype=torch.int32, device="meta")
    router = mr.HashRouter(E, table=np.asarray([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"T \* k = 1073741824 \* 2"):
        router(ids)


def test_expert_choice_tokens_past_int32_raise_even_when_slots_fit(torch):
    # A tiny capacity keeps G * E * C small, but token ids still need T < 2**31.
    logits = torch.empty(2**31, E, device="meta")
    with pytest.raises(ValueError, match=r"T = 2147483648 tokens"):
        mr.ExpertChoice(E, capacity_factor=1e-9)(logits)


def test_capacity_buckets_past_int32_raise(torch):
    # G * (E + 1) capacity buckets wrap long before T * k does with one token per group.
    logits = torch.empty(2**23, 1, 255, device="meta")
    with pytest.raises(ValueError, match=r"G \* \(E \+ 1\) = 8388608 \* 256 = 2147483648"):
        mr.TopK(255, 1, capacity_factor=1.0)(logits)
    mr.TopK(255, 1)(logits)  # without capacity there are no buckets: fine


def test_exactly_int32_max_assignments_route_on_meta(torch):
    # The boundary: 2**31 - 1 assignments fit (the last index and the count are both int32).
    routing = mr.TopK(E, 1)(torch.empty(INDEX_LIMIT, E, device="meta"))
    assert routing.token_ids.shape == (INDEX_LIMIT,)
    plan = mr.make_plan(routing)
    assert plan.order.shape == (INDEX_LIMIT,) and plan.order.device.type == "meta"
    with pytest.raises(ValueError, match="2147483648 assignments"):
        mr.TopK(E, 2)(torch.empty(TOO_MANY, E, device="meta"))


@pytest.mark.parametrize("name", sorted(TOKEN_LAYOUT))
def test_token_layout_past_int32_raises_on_torch_meta(name, torch):
    logits = torch.empty(TOO_MANY, E, device="meta")
    with pytest.raises(ValueError, match=r"T \* k = 1073741824 \* 2 = 2147483648 assignments"):
        _call(name, logits, TOO_MANY)


def _meta_routing(torch, tokens, slots, *, capacity=None):
    """A hand-built token-layout Routing on meta (no policy would build one this large)."""
    ids = torch.empty(tokens * slots, dtype=torch.int32, device="meta")
    return mr.Routing(
        token_ids=ids,
        expert_ids=ids,
        weights=torch.empty(tokens * slots, device="meta"),
        choice_ids=ids,
        probs=torch.empty(tokens, E, device="meta"),
        finite_rows=torch.empty(tokens, dtype=torch.bool, device="meta"),
        num_tokens=tokens,
        num_experts=E,
        layout="token",
        slots=slots,
        capacity=capacity,
    )


@pytest.mark.parametrize("path", ["plugin", "reference"])
def test_make_plan_past_int32_rows_raises_on_torch(path, torch):
    with use_backend("reference" if path == "reference" else "kernels"):
        with pytest.raises(ValueError, match=r"R = 2147483648 plan rows"):
            mr.make_plan(_meta_routing(torch, 2**30, 2))
        with pytest.raises(ValueError, match=r"T = 2147483648 tokens"):
            mr.make_plan(_meta_routing(torch, 2**31, 1))


def test_padded_plan_past_int32_rows_raises(torch):
    # E * (G * C) padded rows can exceed T * k: capacity_factor > 1 pads every expert.
    routing = _meta_routing(torch, 2**20, 1, capacity=2**28)
    with pytest.raises(ValueError, match=r"E \* \(G \* C\) = 8 \* 268435456 = 2147483648 padded"):
        mr.make_plan(routing, pad_to_capacity=True)


def test_stats_and_losses_refuse_wrapping_pair_indices(torch):
    # co_occurrence counts (token, expert) pairs: T * E must fit; the gshard loss counts
    # (group, column) buckets: G * E' must fit.
    routing = mr.TopK(E, 1)(torch.empty(2**28, E, device="meta"))
    with pytest.raises(ValueError, match=r"T \* E = 268435456 \* 8 = 2147483648 token-expert"):
        mr.stats.co_occurrence(routing)
    grouped = mr.TopK(E, 1)(torch.empty(2**28, 1, E, device="meta"))
    with pytest.raises(ValueError, match=r"G \* E' = 268435456 \* 8 = 2147483648 choice"):
        mr.losses.load_balancing(grouped, convention="gshard")
    assert mr.losses.load_balancing(grouped).device.type == "meta"  # one group: fine


def test_jax_policies_and_plan_raise_under_eval_shape():
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    jnp = jax.numpy
    big = jax.ShapeDtypeStruct((TOO_MANY, E), jnp.float32)
    with pytest.raises(ValueError, match=r"T \* k = 1073741824 \* 2 = 2147483648 assignments"):
        jax.eval_shape(lambda logits: mr.TopK(E, 2)(logits), big)
    grouped = jax.ShapeDtypeStruct((8, 2**27, E), jnp.float32)
    with pytest.raises(ValueError, match=r"G \* E \* C = 8 \* 8 \* 33554432"):
        jax.eval_shape(lambda logits: mr.ExpertChoice(E)(logits), grouped)
    fits = jax.ShapeDtypeStruct((2**29, E), jnp.float32)
    shapes = jax.eval_shape(lambda logits: mr.make_plan(mr.TopK(E, 2)(logits)), fits)
    assert shapes.order.shape == (2**30,)

    def plan_of(ids, weights):
        routing = mr.Routing(
            token_ids=ids,
            expert_ids=ids,
            weights=weights,
            choice_ids=ids,
            probs=jnp.zeros((1, E)),
            finite_rows=jnp.ones(1, bool),
            num_tokens=1,
            num_experts=E,
            layout="token",
            slots=2**31,
        )
        return mr.make_plan(routing)

    rows = jax.ShapeDtypeStruct((2**31,), jnp.int32)
    with pytest.raises(ValueError, match=r"R = 2147483648 plan rows"):
        jax.eval_shape(plan_of, rows, jax.ShapeDtypeStruct((2**31,), jnp.float32))
