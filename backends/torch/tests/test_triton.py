"""Triton kernels: the interpreter on CPU at tiny shapes, and a real GPU when there is one.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (it must be set when the kernel module
is first imported, because Triton's own library functions are decorated then, and while kernels
launch): this module sets it at collection, before anything imports Triton. Interpreter steps
cost ~0.5 ms each: keep T <= 16.
"""

import importlib
import os
import sys

import pytest
import torch
from moerouter_torch import _kernels

import moerouter as mr
from moerouter import _registry

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
T, D = 12, 20  # D not a power of two: exercises the column masks

ROUTERS = [
    pytest.param(mr.TopK(num_experts=4, k=2), 4, id="topk"),  # fixed fan-in, all real
    pytest.param(mr.TopK(num_experts=4, k=2, capacity_factor=0.5), 4, id="drops"),  # -1 holes
    pytest.param(mr.NullExperts(num_experts=4, num_null=4, k=2), 8, id="null"),  # variable
    pytest.param(mr.ExpertChoice(num_experts=4, capacity_factor=1.5), 4, id="expert-choice"),
]


@pytest.fixture
def triton_kernels():
    if not (HAS_CUDA or INTERPRETED):
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set; no CUDA either")
    return importlib.import_module("moerouter_torch._triton")


def plan_for(router, columns, seed=0):
    logits = torch.randn(T, columns, generator=torch.Generator().manual_seed(seed))
    return mr.make_plan(router(logits))


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_interpreter_matches_cpu_kernels(triton_kernels, router, columns, dtype):
    plan = plan_for(router, columns)
    x = randn(T, D, seed=1, dtype=dtype)
    ye = randn(plan.num_rows, D, seed=2, dtype=dtype)
    ye[int(plan.num_valid) :] = float("nan")  # rows of no expert must never leak in
    rows, weights = plan.combine_rows, plan.combine_weights
    source, valid = plan.source_tokens, plan.num_valid
    assert torch.equal(
        triton_kernels.dispatch(x, source, valid), _kernels.dispatch(x, source, valid)
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        triton_kernels.combine(ye, rows, weights),
        _kernels.gather_reduce(ye, rows, weights),
        rtol=tol,
        atol=tol,
    )
    torch.testing.assert_close(
        triton_kernels.combine(ye, rows, None), _kernels.gather_reduce(ye, rows, None)
    )
    grad_y = randn(T, D, seed=3, dtype=dtype)
    got = triton_kernels.combine_backward(grad_y, ye, rows, weights, source, valid)
    want = _kernels.combine_backward(grad_y, ye, rows, weights, source, valid)
    for have, expected in zip(got, want, strict=True):
        assert have.dtype == expected.dtype
        torch.testing.assert_close(have, expected, rtol=tol, atol=1e-5)


@pytest.mark.parametrize(
    ("num_experts", "k", "score", "normalize"),
    [
        (8, 2, "softmax", True),  # Mixtral
        (6, 3, "softmax", True),  # E and k not powers of two: padded lanes
        (6, 1, "softmax", False),  # Switch: raw probability
        (8, 4, "sigmoid", True),  # DeepSeek-V3 style
    ],
)
def test_interpreter_topk_router_matches_policy(triton_kernels, num_experts, k, score, normalize):
    logits = randn(T, num_experts, seed=4)
    logits[0, 1] = logits[0, 4] = logits[0].max() + 1  # an exact tie: the lower expert first
    experts, weights = triton_kernels.topk_router(logits, k, score=score, normalize=normalize)
    routing = mr.TopK(num_experts=num_experts, k=k, score=score, normalize=normalize)(logits)
    assert torch.equal(experts.reshape(-1), routing.expert_ids)
    torch.testing.assert_close(weights.reshape(-1), routing.weights, rtol=1e-6, atol=1e-7)


@pytest.fixture(params=["triton", "eager"])
def cuda_path(request, monkeypatch):
    """CUDA tensors through the Triton kernels (their set switched on) or the plain PyTorch ops."""
    if request.param == "triton":
        monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "torch-triton")
    else:
        monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    return request.param


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gpu_public_api_matches_cpu(use_backend, cuda_path, router, columns, dtype):
    use_backend("torch")
    logits = randn(4096, columns, seed=5)
    x = randn(4096, 256, seed=6, dtype=dtype)
    plan = mr.make_plan(router(logits))
    ye = randn(plan.num_rows, 256, seed=7, dtype=dtype)
    plan_gpu = mr.make_plan(router(logits.cuda()))
    for name in ("group_sizes", "order", "inverse", "source_tokens", "combine_rows"):
        assert torch.equal(getattr(plan_gpu, name).cpu(), getattr(plan, name)), name
    assert torch.equal(mr.dispatch(x.cuda(), plan_gpu).cpu(), mr.dispatch(x, plan))
    y_gpu = mr.combine(ye.cuda(), plan_gpu)
    assert torch.equal(mr.combine(ye.cuda(), plan_gpu), y_gpu)  # bit-identical run to run
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y_gpu.cpu(), mr.combine(ye, plan), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("router", "columns"), ROUTERS)
def test_gpu_gradients_match_cpu(use_backend, cuda_path, router, columns, dtype):
    # The backward kernels (dispatch's gather-sum, combine's two gradients) against the CPU
    # kernels, through autograd, down to the router logits.
    use_backend("torch")

    def gradients(device):
        logits = randn(1024, columns, seed=8).to(device).requires_grad_()
        x = randn(1024, 128, seed=9, dtype=dtype).to(device).requires_grad_()
        plan = mr.make_plan(router(logits))
        xe = mr.dispatch(x, plan)
        y = mr.combine(xe * 2 + 1, plan)  # an affine "expert": ye depends on xe
        grad_y = randn(*y.shape, seed=10, dtype=dtype).to(device)
        return [g.float().cpu() for g in torch.autograd.grad(y, (x, logits), grad_y)]

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for have, want in zip(gradients("cuda"), gradients("cpu"), strict=True):
        torch.testing.assert_close(have, want, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("num_experts", "k", "score", "normalize"),
    [
        (64, 8, "softmax", True),  # OLMoE
        (8, 2, "softmax", True),  # Mixtral
        (6, 1, "softmax", False),  # Switch; E not a power of two
        (256, 8, "sigmoid", True),  # DeepSeek-V3 style
    ],
)
def test_gpu_topk_router_matches_policy(triton_kernels, num_experts, k, score, normalize):
    logits = randn(4096, num_experts, seed=11)
    logits[0, 1] = logits[0, 4] = logits[0].max() + 1  # an exact tie: the lower expert first
    routing = mr.TopK(num_experts=num_experts, k=k, score=score, normalize=normalize)(logits)
    experts, weights = triton_kernels.topk_router(
        logits.cuda(), k, score=score, normalize=normalize
    )
    assert torch.equal(experts.reshape(-1).cpu(), routing.expert_ids)
    torch.testing.assert_close(weights.reshape(-1).cpu(), routing.weights, rtol=1e-5, atol=1e-6)
