"""Each policy's declared capabilities (moerouter/_capabilities.py) hold in behaviour.

The docs' support table is rendered from these declarations, so every claim is checked here in
both directions where it is cheap: a policy declared causal must not look at later tokens, and
one declared not causal must be seen to; a policy declared to run under ``jax.jit`` or
``torch.compile`` must give its eager result there, and one declared not to must fail there.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import numpy as np
import pytest
from public_calls import EXAMPLES

import moerouter as mr
import moerouter.policies
from moerouter._capabilities import PolicyCapabilities, capabilities_of
from moerouter.testing import assert_close, to_numpy

E = 4  # real experts (public_calls.E): small, so that compiling every policy stays cheap
G, S = 2, 8  # groups, tokens per group


DECLARED = [pytest.param(cls, id=cls.__name__) for cls in EXAMPLES]


def inputs(cls, seed, groups=G):
    """Logits (or token ids) and the extra inputs of ``cls``'s example, as NumPy arrays."""
    example = EXAMPLES[cls]
    rng = np.random.default_rng(seed)
    if example.columns is None:
        first = rng.integers(0, 50, size=(groups, S)).astype(np.int32)
    else:
        first = rng.standard_normal((groups, S, example.columns)).astype(np.float32)
    return [first] + [make(rng, groups, S) for make in example.extra.values()]


def one_group(arrays, g):
    """Group ``g`` of grouped inputs: (G, S, ...) arrays by group, flat (T,) ones by slice."""
    picked = []
    for array in arrays:
        if array.ndim >= 2 and array.shape[:2] == (G, S):
            picked.append(array[g])
        elif array.shape[:1] == (G * S,):
            picked.append(array[g * S : (g + 1) * S])
        else:  # shared by every token (DeepSeek's bias)
            picked.append(array)
    return picked


def layer(routing, x):
    """``combine(f_e(dispatch(x)))`` with expert ``e`` scaling its rows by ``e + 1``, as NumPy.

    Two routings that send every token to the same experts with the same weights give the same
    output, whatever their layout or row order.
    """
    if isinstance(routing, mr.SoftRouting):
        grouped = routing.dispatch_weights.ndim == 3
        xg = x.reshape(routing.num_groups, -1, x.shape[-1]) if grouped else x
        scale = (1 + np.arange(routing.num_slots) // routing.slots_per_expert).astype(np.float32)
        y = mr.combine(mr.dispatch(xg, routing) * scale[:, None], routing)
        return np.asarray(y).reshape(x.shape)
    plan = mr.make_plan(routing)
    xe = mr.dispatch(x, plan)
    expert = np.repeat(np.arange(routing.num_experts), np.asarray(plan.group_sizes))
    scale = np.ones(xe.shape[0], np.float32)
    scale[: expert.size] = expert + 1
    return np.asarray(mr.combine(xe * scale[:, None], plan))


def features(tokens, seed=7):
    return np.random.default_rng(seed).standard_normal((tokens, 3)).astype(np.float32)


def routing_arrays(routing):
    """Every array of a Routing or SoftRouting, as NumPy, by field name."""
    return {
        f.name: to_numpy(getattr(routing, f.name))
        for f in dataclasses.fields(routing)
        if not isinstance(getattr(routing, f.name), int | str | type(None))
    }


def assert_same_routing(actual, expected):
    got, want = routing_arrays(actual), routing_arrays(expected)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if np.issubdtype(value.dtype, np.floating):
            assert_close(got[name], value, name, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def is_policy(obj):
    """A public class whose call returns a routing (FrozenRandomRouter returns logits)."""
    if not isinstance(obj, type) or not callable(obj):
        return False
    annotation = inspect.signature(obj.__call__).return_annotation
    return str(annotation).split(".")[-1].strip("'\"") in {"Routing", "SoftRouting"}


def test_every_policy_declares_and_has_an_example():
    policies = {obj for obj in map(moerouter.policies.__dict__.get, moerouter.policies.__all__)}
    policies = {obj for obj in policies if is_policy(obj)}
    assert mr.TopK in policies and mr.FrozenRandomRouter not in policies
    undeclared = sorted(cls.__name__ for cls in policies if capabilities_of(cls) is None)
    assert not undeclared, f"declare capabilities on {undeclared} (moerouter/_capabilities.py)"
    assert policies == set(EXAMPLES), "every declared policy needs an example (public_calls)"


def test_a_declaration_is_validated():
    with pytest.raises(ValueError, match="scores"):
        PolicyCapabilities(scores=("tanh",), capacity="none")
    with pytest.raises(ValueError, match="capacity"):
        PolicyCapabilities(scores=(), capacity="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wrapped"):
        PolicyCapabilities(scores=("softmax",), capacity="none", wraps_policy=True)
    # Not inherited by a subclass: a subclass must say what it supports.
    assert capabilities_of(type("Sub", (mr.TopK,), {})) is None
    assert capabilities_of(mr.TopK(E, 1)) is capabilities_of(mr.TopK)


@pytest.mark.parametrize("cls", DECLARED)
def test_capacity(cls):
    declared = capabilities_of(cls)
    example = EXAMPLES[cls]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    arrays = inputs(cls, seed=1)
    if declared.capacity in ("optional", "always"):
        assert "capacity_factor" in fields
        default = fields["capacity_factor"].default
        # "optional" is off by default; "always" has a value by default or none at all (required).
        assert (default is None) == (declared.capacity == "optional")
        routed = {}
        for factor in (0.25, 2.0):
            routing = example.capacity_call(example.make(capacity_factor=factor), arrays)
            routed[factor] = int(np.sum(to_numpy(routing.expert_ids) >= 0))
        assert routed[0.25] < routed[2.0], "the capacity factor must limit the routed choices"
    else:
        assert "capacity_factor" not in fields
    if declared.capacity == "exact":  # every expert gets the same share
        routing = example.make()(*arrays)
        if isinstance(routing, mr.SoftRouting):  # each of an expert's P slots is fully fed
            mass = np.sum(to_numpy(routing.dispatch_weights), axis=-2)
            assert_close(mass, np.ones_like(mass), "slot mass", rtol=1e-6, atol=1e-6)
        else:
            load = to_numpy(mr.stats.summary(routing)["tokens_per_expert"])
            assert np.all(load == load[0]), load
    if declared.capacity == "none" and not declared.wraps_policy:
        routing = example.make()(*arrays)
        assert np.all(to_numpy(routing.expert_ids) >= 0), "no choice may be dropped"


@pytest.mark.parametrize("cls", DECLARED)
def test_scores(cls):
    declared = capabilities_of(cls)
    example = EXAMPLES[cls]
    hints = typing.get_type_hints(cls)
    if "score" in hints:  # the policy offers a choice: exactly the declared ones
        assert set(typing.get_args(hints["score"])) == set(declared.scores)
        variants = {score: example.make(score=score) for score in declared.scores}
    else:
        assert len(declared.scores) <= 1
        variants = {score: example.make() for score in declared.scores}
    logits, *extra = inputs(cls, seed=2)
    x = features(G * S)
    for score, policy in variants.items():
        # A softmax does not see a constant added to every logit; a sigmoid does.
        base = layer(policy(logits, *extra), x)
        shifted = layer(policy(logits + np.float32(1.5), *extra), x)
        if score == "softmax":
            assert_close(shifted, base, f"{score} output", rtol=1e-5, atol=1e-5)
        else:
            assert not np.allclose(shifted, base, rtol=1e-3, atol=1e-3), score


@pytest.mark.parametrize("cls", DECLARED)
def test_groups_are_routed_on_their_own(cls):
    policy = EXAMPLES[cls].make()
    arrays = inputs(cls, seed=3)
    x = features(G * S)
    whole = layer(policy(*arrays), x).reshape(G, S, -1)
    alone = [layer(policy(*one_group(arrays, g)), x.reshape(G, S, -1)[g]) for g in range(G)]
    if capabilities_of(cls).grouped:
        for g in range(G):
            assert_close(whole[g], alone[g], f"group {g}", rtol=1e-5, atol=1e-5)
    else:  # AnchorRouting: an anchor spans the batch
        assert not np.allclose(whole, np.stack(alone), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", DECLARED)
def test_expert_groups(cls):
    declared = capabilities_of(cls)
    example = EXAMPLES[cls]
    names = {f.name for f in dataclasses.fields(cls)}
    assert declared.expert_groups == bool(names & {"num_groups", "num_nodes"})
    assert declared.expert_groups == (example.one_group is not None)
    if declared.expert_groups:
        routing = example.one_group()(*inputs(cls, seed=4))
        experts = to_numpy(routing.expert_ids).reshape(G * S, -1)
        block = E // example.expert_blocks
        for row in experts:
            assert len({e // block for e in row if e >= 0}) <= 1, row


def later_half_replaced(array, other, scale):
    """``array`` (one group) with its later tokens' entries taken from ``other``."""
    if array.shape[:1] not in {(1,), (S,)} or array.shape[:2] == (1, E):
        return array  # shared by every token (DeepSeek's bias)
    mixed = array.copy()
    if array.shape[:1] == (1,):  # (1, S, ...)
        mixed[:, S // 2 :] = other[:, S // 2 :] * scale
    else:  # (T,) with T = S
        mixed[S // 2 :] = other[S // 2 :]
    return mixed


@pytest.mark.parametrize("cls", DECLARED)
def test_causal(cls):
    # Later tokens get new logits of a larger scale (and new per-token inputs): a policy that
    # compares tokens (expert choice, transport plans, slots, anchors) then changes an earlier
    # token's output; a causal one must not.
    declared = capabilities_of(cls)
    policy = EXAMPLES[cls].make()
    now, new = inputs(cls, seed=5, groups=1), inputs(cls, seed=6, groups=1)
    scales = [4 if now[0].dtype.kind == "f" else 1] + [1] * (len(now) - 1)
    changed = [later_half_replaced(*args) for args in zip(now, new, scales, strict=True)]
    x = features(S)
    before = layer(policy(*now), x)[: S // 2]
    after = layer(policy(*changed), x)[: S // 2]
    if declared.causal:
        assert_close(after, before, "earlier tokens", rtol=1e-6, atol=1e-6)
    else:
        assert not np.allclose(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", DECLARED)
def test_jax_jit(cls, monkeypatch):
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")  # makes Routing a pytree
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")
    policy = EXAMPLES[cls].make()
    arrays = [jax.numpy.asarray(a) for a in inputs(cls, seed=8)]
    jitted = jax.jit(lambda *a: policy(*a))
    if capabilities_of(cls).jax_jit:
        assert_same_routing(jitted(*arrays), policy(*arrays))
    else:
        with pytest.raises(Exception):  # noqa: B017 (whatever jax raises: the claim holds)
            jitted(*arrays)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("cls", DECLARED)
def test_torch_compile(cls, monkeypatch):
    # aot_eager traces forward and backward graphs as inductor would, without minutes of C++
    # code generation on a 2-core machine.
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")
    torch._dynamo.reset()  # every test compiles the same lambda: stay under the recompile limit
    policy = EXAMPLES[cls].make()
    arrays = [torch.asarray(a) for a in inputs(cls, seed=9)]
    compiled = torch.compile(lambda *a: policy(*a), backend="aot_eager", fullgraph=True)
    if capabilities_of(cls).torch_compile:
        assert_same_routing(compiled(*arrays), policy(*arrays))
    else:
        with pytest.raises(Exception):  # noqa: B017 (whatever dynamo raises: the claim holds)
            compiled(*arrays)
