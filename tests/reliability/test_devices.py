"""Failure model: an array built on the host while the caller's arrays live on a device.

Every array the library creates must take its device from its inputs (``device=`` on every
constructor). A slip (``xp.arange(n)`` without ``device=``) builds that array on the CPU: on a GPU
the next operation raises a device mismatch, or an output such as ``Routing.token_ids`` silently
stays on the host. CPU tensors cannot show the slip, so these tests use torch's ``meta`` device:
a meta tensor has a shape and a dtype but no data, any operation mixing it with a CPU tensor
raises, and every output must report ``device == meta``. CPU-only CI catches the slip before a
GPU user does.

Every public call of ``public_calls.CALLS`` (each policy, loss, stat, plan, dispatch, combine and
method function) runs twice: on CPU tensors, for reference shapes and dtypes, and on meta
tensors, where each output must have the same shape and dtype and live on meta. A public name
without a call (or a stated reason) fails ``test_every_public_name_is_covered``. The few offline
functions that read values on the host must say so with a clear error on meta.
``moerouter_torch.MoE`` and ``GroupedMLP`` run forward and backward on meta.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
moerouter_torch = pytest.importorskip("moerouter_torch")

from public_calls import (  # noqa: E402
    CALLS,
    NOT_CALLED,
    TOKEN_WISE,
    E,
    Inputs,
    K,
    called_names,
    leaves,
    public_names,
)

import moerouter as mr  # noqa: E402
from moerouter.testing import Backend, use_backend  # noqa: E402

META = torch.device("meta")
CPU = torch.device("cpu")


def _inputs(device: Any) -> Inputs:
    xp = Backend.TORCH.namespace()
    return Inputs(lambda array: torch.as_tensor(array, device=device), xp, device)


@pytest.fixture(params=["plugin", "reference"])
def path(request):
    """The torch plugin's kernels, or the agnostic path (MOEROUTER_BACKEND=reference)."""
    with use_backend("reference" if request.param == "reference" else "kernels"):
        yield request.param


def _check_on_meta(reference: Any, on_meta: Any) -> None:
    """``on_meta`` has the structure, shapes and dtypes of ``reference`` and lives on meta."""
    expected, got = leaves(reference), leaves(on_meta)
    assert len(got) == len(expected) > 0
    for want, have in zip(expected, got, strict=True):
        assert isinstance(have, torch.Tensor), f"a {type(have).__name__} is not a device array"
        assert have.device == META, f"an output of shape {tuple(have.shape)} is on {have.device}"
        assert tuple(have.shape) == tuple(want.shape)
        assert have.dtype == want.dtype


def test_every_public_name_is_covered():
    # A new public function must get a meta call in public_calls.CALLS (or a reason).
    public = public_names()
    missing = public - called_names() - set(NOT_CALLED)
    assert not missing, f"public names without a device check: {sorted(missing)}"
    stale = (called_names() | set(NOT_CALLED)) - public
    assert not stale, f"checked names that are not public: {sorted(stale)}"


# Token-wise calls on 2-D (T, E') and grouped 3-D (G, S, E') inputs; the rest once.
CASES = [(name, (8,)) for name in sorted(CALLS)] + [(name, (2, 8)) for name in sorted(TOKEN_WISE)]


@pytest.mark.parametrize(("name", "lead"), CASES, ids=[f"{n}-{len(lead)}d" for n, lead in CASES])
def test_public_call_stays_on_the_inputs_device(name, lead):
    call = CALLS[name]
    reference = call(_inputs(CPU), lead)
    _check_on_meta(reference, call(_inputs(META), lead))


PLAN_CASES = sorted(
    name for name in TOKEN_WISE if name.startswith(("make_plan", "dispatch", "combine"))
)


@pytest.mark.parametrize("name", PLAN_CASES)
def test_plan_dispatch_combine_on_meta_on_every_path(name, path):
    # The torch plugin's custom ops (their fake kernels run on meta) and the agnostic path.
    call = CALLS[name]
    _check_on_meta(call(_inputs(CPU), (8,)), call(_inputs(META), (8,)))


# Host-side functions: on meta they must name the function and the parameter whose values they
# read, instead of torch's "Cannot copy out of meta tensor".
HOST_SIDE = {
    "ensemble.branch_parameters": (
        lambda a: mr.ensemble.branch_parameters([{"w": a.floats(2)}] * 3, a.uniform(3), k=2),
        "branch_parameters reads the values of posterior",
    ),
    "ensemble.average_parameters[array weights]": (
        lambda a: mr.ensemble.average_parameters([{"w": a.floats(2)}] * 3, a.uniform(3)),
        "average_parameters reads the values of weights",
    ),
    "merging.num_groups_per_layer": (
        lambda a: mr.merging.num_groups_per_layer(a.uniform(2, E), 2),
        "num_groups_per_layer reads the values of frequencies",
    ),
    "merging.weight_matching_permutation": (
        lambda a: mr.merging.weight_matching_permutation(
            {"w": a.floats(3, 2)}, {"w": a.floats(3, 2)}, {"w": 0}
        ),
        r"weight_matching_permutation reads the values of reference\['w'\]",
    ),
    "merging.align_experts": (
        lambda a: mr.merging.align_experts(
            {"w": a.floats(2, 3, 2)}, a.ints(0, 1, 2), a.ints(0, 1, 1), neuron_axis={"w": 0}
        ),
        "align_experts reads the values of expert_map",
    ),
    "traces.to_numpy": (
        lambda a: mr.traces.to_numpy(a.floats(3)),
        "traces.to_numpy reads the values of the array",
    ),
    "multitask.hierarchy_mask": (
        lambda a: mr.multitask.hierarchy_mask(
            a.ints(0, 2, 3), num_shared=1, num_per_category=1, num_per_task=1
        ),
        "hierarchy_mask reads the values of task_category",
    ),
}


@pytest.mark.parametrize("name", sorted(HOST_SIDE))
def test_host_side_function_names_what_it_reads_on_meta(name):
    call, message = HOST_SIDE[name]
    pytest.importorskip("scipy")
    call(_inputs(CPU))  # concrete values: fine
    with pytest.raises(ValueError, match=message):
        call(_inputs(META))


def test_host_side_functions_are_the_ones_listed():
    # Every "host-side" entry of NOT_CALLED has an error check above.
    host_side = {name for name, reason in NOT_CALLED.items() if reason.startswith("host-side")}
    assert host_side <= {name.partition("[")[0] for name in HOST_SIDE}


ROUTERS = {
    "TopK": mr.TopK(E, K),
    "TopK[capacity]": mr.TopK(E, K, capacity_factor=1.0),
    "NullExperts": mr.NullExperts(E, 2, K),
    "ExpertChoice": mr.ExpertChoice(E),
    "DeepSeekTopK[grouped]": mr.DeepSeekTopK(E, K, num_groups=2, topk_groups=1),
}


@pytest.mark.parametrize("router", list(ROUTERS.values()), ids=list(ROUTERS))
@pytest.mark.parametrize("shared", [None, 8], ids=["routed", "shared"])
def test_moe_forward_and_backward_on_meta(router, shared, path):
    layer = moerouter_torch.MoE(6, 8, router, shared_intermediate_size=shared, device=META)
    x = torch.randn(3, 5, 6, device=META, requires_grad=True)
    y, losses = layer(x)
    assert y.device == META and y.shape == x.shape
    assert {name: value.shape for name, value in losses.items()} == {
        "load_balancing": (),
        "z_loss": (),
    }
    (y.sum() + sum(losses.values())).backward()
    assert x.grad.device == META and x.grad.shape == x.shape
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.device == META and parameter.grad.shape == parameter.shape, name


def test_grouped_mlp_and_grouped_mm_forward_and_backward_on_meta():
    experts = moerouter_torch.GroupedMLP(E, 6, 8, activation="gelu", device=META)
    xe = torch.randn(10, 6, device=META, requires_grad=True)
    group_sizes = torch.zeros(E, dtype=torch.int32, device=META)
    out = experts(xe, group_sizes)
    weight = torch.randn(E, 6, 3, device=META, requires_grad=True)
    product = moerouter_torch.grouped_mm(xe, weight, group_sizes)
    assert (out.device, tuple(out.shape)) == (META, (10, 6))
    assert (product.device, tuple(product.shape)) == (META, (10, 3))
    (out.sum() + product.sum()).backward()
    for grad, like in ((xe.grad, xe), (weight.grad, weight), (experts.w_in.grad, experts.w_in)):
        assert grad.device == META and grad.shape == like.shape


@pytest.mark.parametrize("router", list(ROUTERS.values()), ids=list(ROUTERS))
def test_gradients_reach_logits_and_tokens_on_meta(router, path):
    logits = torch.randn(12, router.num_experts + getattr(router, "num_null", 0), device=META)
    logits.requires_grad_(True)
    x = torch.randn(12, 6, device=META, requires_grad=True)
    routing = router(logits)
    plan = mr.make_plan(routing)
    y = mr.combine(mr.dispatch(x, plan) * 2.0, plan)
    loss = y.sum() + mr.losses.load_balancing(routing) + mr.losses.z_loss(logits)
    loss.backward()
    assert logits.grad.device == META and logits.grad.shape == logits.shape
    assert x.grad.device == META and x.grad.shape == x.shape
