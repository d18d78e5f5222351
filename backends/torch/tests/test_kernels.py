"""The torch kernels return exactly what the agnostic reference returns, and differentiate."""

import sys
import types
from dataclasses import fields

import moerouter_torch
import pytest
import torch
from moerouter_torch import _kernels, _ops

import moerouter as mr
from moerouter import _registry

T, D = 24, 16

ROUTERS = [
    # Mixtral-style softmax top-2: fixed fan-in, every slot real.
    pytest.param(mr.TopK(num_experts=8, k=2), 8, id="topk"),
    # Sigmoid scores (DeepSeek-V3 style) with k = 1.
    pytest.param(mr.TopK(num_experts=4, k=1, score="sigmoid"), 4, id="sigmoid-k1"),
    # Capacity drops leave -1 holes inside a token's k slots and rows past num_valid.
    pytest.param(mr.TopK(num_experts=6, k=3, capacity_factor=0.5), 6, id="capacity-drops"),
    # Null experts: a variable number of real assignments per token, some tokens route nowhere.
    pytest.param(mr.NullExperts(num_experts=4, num_null=4, k=3), 8, id="null-experts"),
    # Expert layout: variable fan-in up to E, combine_rows padded with -1.
    pytest.param(mr.ExpertChoice(num_experts=4, capacity_factor=1.5), 4, id="expert-choice"),
]


def logits_for(columns, *, seed=0, groups=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (T, columns) if groups is None else (groups, T // groups, columns)
    logits = torch.randn(shape, generator=generator)
    logits.view(-1, columns)[3] = float("nan")  # a non-finite row routes nowhere
    return logits


def run_all(router, logits, x, ye):
    plan = mr.make_plan(router(logits))
    return plan, mr.dispatch(x, plan), mr.combine(ye, plan)


def random_rows(rows, seed, dtype=torch.float32):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("groups", [None, 2], ids=["flat", "grouped"])  # groups offset token ids
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_plan_dispatch_combine_match_reference(use_backend, router, columns, groups):
    logits = logits_for(columns, groups=groups)
    x = random_rows(T, 1)
    rows = mr.make_plan(router(logits)).num_rows
    ye = random_rows(rows, 2)
    use_backend("reference")
    expected = run_all(router, logits, x, ye)
    use_backend("torch")
    got = run_all(router, logits, x, ye)
    for field in fields(mr.Plan):
        want, have = getattr(expected[0], field.name), getattr(got[0], field.name)
        if isinstance(want, torch.Tensor):
            assert have.dtype == want.dtype, field.name
            assert have.shape == want.shape, field.name
            assert torch.equal(have, want), field.name
        else:
            assert have == want, field.name
    assert torch.equal(got[1], expected[1])  # dispatch is a copy: bit-identical
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_dtypes_and_run_to_run_identity(use_backend, router, columns, dtype):
    plan = mr.make_plan(router(logits_for(columns)))
    x = random_rows(T, 3, dtype)
    ye = random_rows(plan.num_rows, 4, dtype)
    use_backend("torch")
    xe, y = mr.dispatch(x, plan), mr.combine(ye, plan)
    assert xe.dtype == dtype and y.dtype == dtype
    assert torch.equal(mr.combine(ye, plan), y)  # no atomics: bit-identical every run
    # The float64 loop reference: sum of w * row in the order of the slots, rounded once.
    want = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for f in range(plan.combine_rows.shape[1]):
            row = int(plan.combine_rows[t, f])
            if row >= 0:
                want[t] += float(plan.combine_weights[t, f]) * ye[row].double()
    # Float32 accumulation strays from float64 by float32 rounding; a low-precision output is
    # then rounded once, so it is within one of its own ulps of the rounded float64 sum.
    rtol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
    torch.testing.assert_close(y, want.to(dtype), rtol=rtol[dtype], atol=1e-5)
    valid = int(plan.num_valid)
    assert torch.equal(xe[:valid], x[plan.source_tokens[:valid].long()])
    assert not xe[valid:].any()


def test_low_precision_weights_split_exactly():
    # bfloat16 embedding_bag takes bfloat16 weights; three bfloat16 parts carry a float32 weight
    # exactly, so the low-precision combine multiplies by the true float32 weight.
    weights = torch.rand(1000, generator=torch.Generator().manual_seed(20)) * 3 - 1
    rows = torch.arange(1000)
    offsets = torch.arange(0, 1000, 4)
    split_rows, split_offsets, parts = _kernels._split_weights(
        rows, offsets, weights, torch.bfloat16
    )
    assert torch.equal(parts.float().reshape(-1, 3).sum(1), weights)
    assert torch.equal(split_rows, rows.repeat_interleave(3))
    assert torch.equal(split_offsets, offsets * 3)


def test_combine_ignores_rows_past_num_valid(use_backend):
    # Experts may leave garbage (even NaN) in rows that belong to no expert.
    plan = mr.make_plan(mr.NullExperts(num_experts=4, num_null=4, k=3)(logits_for(8)))
    valid = int(plan.num_valid)
    assert valid < plan.num_rows
    ye = random_rows(plan.num_rows, 5)
    ye[valid:] = float("nan")
    use_backend("torch")
    assert torch.isfinite(mr.combine(ye, plan)).all()
    assert torch.isfinite(mr.combine(ye.bfloat16(), plan)).all()


def test_plan_invariants(use_backend):
    use_backend("torch")
    routing = mr.TopK(num_experts=6, k=3, capacity_factor=0.5)(logits_for(6))
    plan = mr.make_plan(routing)
    order, inverse = plan.order.long(), plan.inverse.long()
    assert torch.equal(order[inverse], torch.arange(plan.num_rows))  # inverse permutation
    assert int(plan.group_sizes.sum()) == int(plan.num_valid)  # offsets sum to the valid rows
    experts = routing.expert_ids[order][: int(plan.num_valid)]
    assert torch.equal(experts, torch.sort(experts).values)  # grouped by expert
    assert (routing.expert_ids[order][int(plan.num_valid) :] == -1).all()


def test_token_outputs_do_not_depend_on_other_tokens(use_backend):
    # Batch invariance: rerouting other tokens leaves token 0's output bit-identical.
    use_backend("torch")
    router = mr.TopK(num_experts=8, k=2)
    logits = logits_for(8)
    other = logits.clone()
    other[1:] = torch.randn(T - 1, 8, generator=torch.Generator().manual_seed(9))
    ye_token0 = random_rows(2, 6)

    def token0(lg):
        plan = mr.make_plan(router(lg))
        ye = torch.zeros(plan.num_rows, D)
        ye[plan.combine_rows[0].long()] = ye_token0
        return mr.combine(ye, plan)[0]

    assert torch.equal(token0(logits), token0(other))


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gradients_match_reference(use_backend, router, columns):
    # Gradients reach x, the expert outputs and, through the weights, the router logits.
    def loss_and_grads():
        logits = logits_for(columns).requires_grad_()
        x = random_rows(T, 11).requires_grad_()
        scale = random_rows(1, 12).requires_grad_()
        plan = mr.make_plan(router(logits))
        y = mr.combine(torch.tanh(mr.dispatch(x, plan)) * scale, plan)
        (y * random_rows(T, 13)).sum().backward()
        return [t.grad for t in (logits, x, scale)]

    use_backend("reference")
    expected = loss_and_grads()
    use_backend("torch")
    got = loss_and_grads()
    for have, want in zip(got, expected, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gradcheck_float64(router, columns):
    plan = mr.make_plan(router(logits_for(columns)))
    rows, source, valid = plan.combine_rows, plan.source_tokens, plan.num_valid
    x = random_rows(T, 14, torch.float64).requires_grad_()
    ye = random_rows(plan.num_rows, 15, torch.float64).requires_grad_()
    weights = plan.combine_weights.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: _ops.dispatch(x, source, valid, rows), (x,), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda ye, w: _ops.combine(ye, rows, w, source, valid), (ye, weights), fast_mode=True
    )


def test_library_opcheck():
    # torch.library's own checks: schema, fake tensors, autograd registration.
    plan = mr.make_plan(mr.TopK(num_experts=6, k=3, capacity_factor=0.5)(logits_for(6)))
    x = random_rows(T, 16).requires_grad_()
    ye = random_rows(plan.num_rows, 17).requires_grad_()
    weights = plan.combine_weights.clone().requires_grad_()
    args = (plan.source_tokens, plan.num_valid, plan.combine_rows)
    torch.library.opcheck(_ops.dispatch, (x, *args))
    torch.library.opcheck(
        _ops.combine, (ye, plan.combine_rows, weights, plan.source_tokens, plan.num_valid)
    )
    torch.library.opcheck(_ops.gather_sum, (ye.detach(), plan.combine_rows))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize(("router", "columns"), [ROUTERS[0], ROUTERS[4]])
def test_compile_fullgraph_route_plan_dispatch_combine(use_backend, router, columns):
    # No graph break from the logits to the output and back: the ops' fake implementations give
    # static shapes. aot_eager traces exactly what inductor would, without compiling C++.
    use_backend("torch")
    weight = random_rows(columns, 18).T.contiguous().requires_grad_()

    def layer(x):
        plan = mr.make_plan(router(x @ weight))
        return mr.combine(torch.tanh(mr.dispatch(x, plan)), plan)

    x = random_rows(T, 19).requires_grad_()
    eager = layer(x)
    eager.sum().backward()
    grads = (x.grad.clone(), weight.grad.clone())
    x.grad, weight.grad = None, None
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])


def test_triton_kernels_run_only_on_cuda_while_their_set_is_on(monkeypatch):
    # The Triton kernels have not passed on a GPU yet: CUDA tensors take the plain PyTorch
    # kernels unless MOEROUTER_UNVERIFIED_KERNELS names their set; CPU tensors never use them.
    fake_module = types.ModuleType("moerouter_torch._triton")
    monkeypatch.setattr(moerouter_torch, "_triton", fake_module, raising=False)
    monkeypatch.setitem(sys.modules, "moerouter_torch._triton", fake_module)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    assert _ops._triton_for(on_cuda) is None
    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "torch-triton")
    assert _ops._triton_for(on_cuda) is fake_module
    assert _ops._triton_for(torch.zeros(1)) is None
    assert _ops.TRITON in moerouter_torch.backend.kernel_sets
