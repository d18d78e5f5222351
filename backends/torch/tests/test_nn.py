"""GroupedMLP and MoE equal a dense per-expert loop, and null experts really skip work."""

import types

import moerouter_torch
import pytest
import torch
from moerouter_torch import GroupedMLP, MoE, _grouped

import moerouter as mr
from moerouter import _registry

T, D, H = 20, 8, 12


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def expert_of_rows(group_sizes, num_rows):
    experts = torch.repeat_interleave(torch.arange(len(group_sizes)), group_sizes.long())
    return torch.cat([experts, torch.full((num_rows - len(experts),), -1)])


def dense_expert(mlp, expert, row):
    hidden = row @ mlp.w_in[expert]
    return moerouter_torch.nn._activate(hidden, mlp.activation) @ mlp.w_out[expert]


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu", "silu"])
def test_grouped_mlp_equals_per_expert_loop(activation):
    torch.manual_seed(0)
    mlp = GroupedMLP(4, D, H, activation=activation)
    group_sizes = torch.tensor([3, 0, 5, 2], dtype=torch.int32)  # an empty expert, 4 spare rows
    xe = randn(14, D)
    out = mlp(xe, group_sizes)
    experts = expert_of_rows(group_sizes, 14)
    for row in range(14):
        want = torch.zeros(D) if experts[row] < 0 else dense_expert(mlp, experts[row], xe[row])
        torch.testing.assert_close(out[row], want)


def test_grouped_mm_gradcheck_float64():
    group_sizes = torch.tensor([2, 0, 3], dtype=torch.int32)
    x = randn(7, 3, dtype=torch.float64).requires_grad_()
    weight = randn(3, 3, 4, seed=1, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: _grouped.grouped_mm(x, w, group_sizes), (x, weight)
    )


def test_null_experts_compute_fewer_rows(monkeypatch):
    # Rows that go to null experts never reach a matmul: FLOPs are saved for real.
    seen = []

    def counting(rows, weight):
        seen.append(rows.shape[0])
        return rows @ weight

    monkeypatch.setattr(_grouped, "_expert_matmul", counting)
    torch.manual_seed(0)
    layer = MoE(D, H, mr.NullExperts(num_experts=4, num_null=4, k=2))
    with torch.no_grad():
        layer.gate.weight[4:] += 1.0  # make null experts popular
    x = randn(T, D, seed=2)
    plan = mr.make_plan(layer.router(layer.gate(x)))
    valid = int(plan.num_valid)
    assert valid < plan.num_rows
    y, _ = layer(x)
    forward_rows = sum(seen[: len(seen) // 2]), sum(seen[len(seen) // 2 :])
    assert forward_rows == (valid, valid)  # both expert matmuls see only the valid rows
    y.sum().backward()
    assert layer.experts.w_in.grad is not None


@pytest.mark.parametrize(
    "router",
    [
        mr.TopK(num_experts=4, k=2),  # Mixtral-style
        mr.NullExperts(num_experts=4, num_null=2, k=2),  # adaptive number of experts
        mr.ExpertChoice(num_experts=4, capacity_factor=1.0),  # variable fan-in
    ],
    ids=["topk", "null", "expert-choice"],
)
@pytest.mark.parametrize("shared", [None, 6], ids=["routed-only", "shared-expert"])
def test_moe_equals_dense_reference(router, shared):
    torch.manual_seed(0)
    layer = MoE(D, H, router, shared_intermediate_size=shared)
    x = randn(2, T // 2, D, seed=3)
    y, losses = layer(x)
    assert y.shape == x.shape
    assert set(losses) == {"load_balancing", "z_loss"}
    routing = router(layer.gate(x.reshape(-1, D)))
    want = torch.zeros(T, D)
    for token, expert, weight in zip(
        routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights, strict=True
    ):
        if expert >= 0:
            want[token] += weight * dense_expert(layer.experts, expert, x.reshape(-1, D)[token])
    if shared is not None:
        want += dense_expert(layer.shared, 0, x.reshape(-1, D))
    torch.testing.assert_close(y.reshape(-1, D), want, rtol=1e-5, atol=1e-5)
    (y.sum() + losses["load_balancing"] + losses["z_loss"]).backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_moe_compiles_fullgraph(use_backend):
    use_backend("torch")
    torch.manual_seed(0)
    layer = MoE(D, H, mr.TopK(num_experts=4, k=2), shared_intermediate_size=6)
    x = randn(T, D, seed=4)
    torch._dynamo.reset()
    # Compiled before any eager call: the layer resolved the backend plugin when it was built.
    compiled, losses = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    eager, _ = layer(x)
    torch.testing.assert_close(compiled, eager)
    (compiled.sum() + losses["load_balancing"]).backward()
    assert layer.gate.weight.grad is not None


def test_grouped_mm_kernel_only_while_its_set_is_on(monkeypatch):
    # torch._grouped_mm has not run here on a GPU: the per-expert loop runs until its kernel set
    # passes or is asked for, even on a GPU that could run it.
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(16, 8))
    weight = types.SimpleNamespace(dtype=torch.bfloat16, shape=(2, 8, 8))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kwargs: None, raising=False)
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    assert not _grouped._use_grouped_mm(x, weight)
    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "torch-grouped-mm")
    assert _grouped._use_grouped_mm(x, weight)
    assert _grouped.GROUPED_MM in moerouter_torch.backend.kernel_sets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grouped_mm_set", ["on", "off"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_grouped_mlp_matches_float64_loop(monkeypatch, grouped_mm_set, dtype):
    # GroupedMLP on CUDA (torch._grouped_mm for bfloat16 on compute capability >= 9.0 when its
    # set is on, the per-expert loop otherwise) against a float64 per-expert loop on the CPU,
    # forward and backward, with an empty expert and spare rows past the groups.
    if grouped_mm_set == "on":
        monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "torch-grouped-mm")
    else:
        monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    torch.manual_seed(0)
    mlp = GroupedMLP(4, 64, 96, device="cuda", dtype=dtype)
    reference = GroupedMLP(4, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        reference.w_in.copy_(mlp.w_in.double())
        reference.w_out.copy_(mlp.w_out.double())
    group_sizes = torch.tensor([300, 0, 517, 211], dtype=torch.int32)
    xe = randn(1100, 64, seed=3)
    grad = randn(1100, 64, seed=4)
    x_gpu = xe.to("cuda", dtype).requires_grad_()
    x_ref = xe.double().requires_grad_()
    out = mlp(x_gpu, group_sizes.cuda())
    want = reference(x_ref, group_sizes)
    assert torch.all(out[1028:] == 0)  # rows past the groups are zero
    out.backward(grad.to("cuda", dtype))
    want.backward(grad.double())
    # Relative to each tensor's largest entry: bfloat16 rounds the hidden layer (2^-8 each).
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    pairs = [(out, want), (x_gpu.grad, x_ref.grad), (mlp.w_in.grad, reference.w_in.grad),
             (mlp.w_out.grad, reference.w_out.grad)]  # fmt: skip
    for have, expected in pairs:
        scale = expected.detach().abs().max().item()
        torch.testing.assert_close(
            have.detach().double().cpu() / scale, expected.detach() / scale, rtol=tol, atol=tol
        )


# --- AdaMoE conversion (moerouter.adamoe) -----------------------------------------------------

CONVERSIONS = [(0, 2), (8, 3), (8, 4), (16, 4), (16, 6), (24, 5)]  # (num_null, k'), E = 8, k = 2


@pytest.mark.parametrize(("num_null", "k_prime"), CONVERSIONS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_adamoe_is_bit_identical_and_round_trips(num_null, k_prime, activation, dtype):
    torch.manual_seed(num_null + k_prime)
    moe = MoE(32, 16, mr.TopK(8, k=2), activation=activation, dtype=dtype)
    x = randn(3, 70, 32, seed=num_null, dtype=dtype)
    before, _ = moe(x)
    router = moe.router
    assert moe.to_adamoe(num_null, k_prime) is moe
    assert moe.router == mr.NullExperts(8, num_null=num_null, k=k_prime)
    assert moe.gate.weight.shape == (8 + num_null, 32)
    converted, _ = moe(x)
    assert torch.equal(converted, before)  # bit for bit, not merely close
    converted.sum().backward()  # the new gate is a trainable parameter
    assert moe.gate.weight.grad is not None
    moe.from_adamoe()
    assert moe.router is router and moe.gate.weight.shape == (8, 32)
    assert torch.equal(moe(x)[0], before)


def test_one_wide_gate_product_would_not_be_exact():
    # Why MoE.gate_logits applies the gate E rows at a time: one (d, 3E) product rounds the tiled
    # rows differently from the (d, E) one on this BLAS, which changes weights in the last bits.
    torch.manual_seed(0)
    weight, x = torch.randn(8, 32), torch.randn(500, 32)
    tiled = mr.adamoe.tile_null_rows(weight, 16)
    moe = MoE(32, 16, mr.NullExperts(8, num_null=16, k=4))
    moe.gate.weight.data.copy_(tiled)
    chunked = moe.gate_logits(x)
    assert torch.equal(chunked[:, :8], x @ weight.T) and torch.equal(
        chunked[:, 8:16], chunked[:, :8]
    )
    assert torch.equal(chunked[:, 16:], chunked[:, :8])


def test_built_with_null_experts_starts_tiled_or_random():
    torch.manual_seed(0)
    tiled = MoE(8, 4, mr.NullExperts(4, num_null=8, k=2))
    rows = tiled.gate.weight
    assert torch.equal(rows[4:8], rows[:4]) and torch.equal(rows[8:], rows[:4])
    random = MoE(8, 4, mr.NullExperts(4, num_null=8, k=2), null_init="random")
    assert not torch.equal(random.gate.weight[4:8], random.gate.weight[:4])
    with pytest.raises(ValueError, match="null_init must be 'tiled' or 'random'"):
        MoE(8, 4, mr.TopK(4, k=2), null_init="copied")
    # built with null experts, from_adamoe needs the k to return to
    with pytest.raises(ValueError, match="k must be given"):
        tiled.from_adamoe()
    assert tiled.from_adamoe(k=2).router == mr.TopK(4, k=2)
    assert tiled.gate.weight.shape == (4, 8)


@pytest.mark.parametrize(
    ("router", "num_null", "k", "error", "message"),
    [
        (mr.TopK(8, k=2), 8, 1, ValueError, "k must be >="),
        (mr.TopK(8, k=2), 12, 4, ValueError, "num_null must be a multiple"),
        (mr.TopK(8, k=1, normalize=False), 8, 2, ValueError, "router must be a softmax TopK"),
        (
            mr.ExpertChoice(8, capacity_factor=1.0),
            8,
            4,
            TypeError,
            "router must be a moerouter.TopK",
        ),
    ],
    ids=["k-below", "not-divisible", "not-normalised", "expert-choice"],
)
def test_bad_conversion_changes_nothing(router, num_null, k, error, message):
    moe = MoE(8, 4, router)
    weight = moe.gate.weight
    with pytest.raises(error, match=message):
        moe.to_adamoe(num_null, k)
    assert moe.router is router and moe.gate.weight is weight
    with pytest.raises(TypeError, match=r"router must be a moerouter\.NullExperts"):
        moe.from_adamoe(k=2)
