"""Noise, jitter and GShard's random second expert on every backend, randomness as an input."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, assert_routing_equal, edge_case_logits, to_numpy
from moerouter.testing.reference.gates import (
    reference_multiplicative_jitter,
    reference_noisy_top_k_std,
    reference_vmoe_logit_noise,
)
from moerouter.testing.reference.token_choice import reference_gshard_top2, reference_topk

NUM_EXPERTS = 8


def draws(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.random(shape).astype(np.float32)


@pytest.mark.parametrize(
    "noise_std",
    [
        pytest.param(1.0, id="vmoe-default"),  # V-MoE's noise_std = 1: std 1/E.
        pytest.param(0.0, id="no-noise"),  # zero noise returns the logits (as float32).
    ],
)
def test_vmoe_logit_noise(backend, noise_std):
    logits = np.random.default_rng(30).standard_normal((2, 5, NUM_EXPERTS)).astype(np.float32)
    normal, _ = draws(logits.shape, 31)
    noisy = mr.vmoe_logit_noise(
        backend.asarray(logits), backend.asarray(normal), noise_std=noise_std
    )
    assert to_numpy(noisy).dtype == np.float32
    assert_close(noisy, reference_vmoe_logit_noise(logits, normal, noise_std), "noisy")


def test_vmoe_noisy_routing_is_equal_on_every_backend(backend):
    # The point of explicit randomness: the same draws give the same decision everywhere.
    # V-MoE routes the softmax of the noisy logits without renormalising the top-k.
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=32)
    normal, _ = draws(logits.shape, 33)
    noisy = mr.vmoe_logit_noise(backend.asarray(logits), backend.asarray(normal))
    routing = mr.TopK(NUM_EXPERTS, 2, normalize=False, capacity_factor=1.0)(noisy)
    noisy_numpy = mr.vmoe_logit_noise(logits, normal)
    assert_routing_equal(
        routing, reference_topk(noisy_numpy, 2, normalize=False, capacity_factor=1.0)
    )


def test_noisy_top_k_std(backend):
    # Shazeer's softplus scale, including large |x| where a naive softplus overflows.
    noise_logits = np.array([[-100.0, -3.0, 0.0, 2.5, 50.0, 100.0]], np.float32)
    std = mr.noisy_top_k_std(backend.asarray(noise_logits))
    assert_close(std, reference_noisy_top_k_std(noise_logits), "std")
    assert np.all(np.isfinite(to_numpy(std)))


def test_shazeer_noisy_top_k(backend):
    # H = clean + N(0,1) * (softplus(x W_noise) + eps); G = softmax over the kept k of H.
    rng = np.random.default_rng(34)
    clean = rng.standard_normal((24, NUM_EXPERTS)).astype(np.float32)
    noise_logits = rng.standard_normal((24, NUM_EXPERTS)).astype(np.float32)
    normal, _ = draws(clean.shape, 35)
    std = mr.noisy_top_k_std(backend.asarray(noise_logits))
    noisy = mr.gaussian_noise(backend.asarray(clean), backend.asarray(normal), std)
    expected = clean + normal * reference_noisy_top_k_std(noise_logits)
    assert_close(noisy, expected, "noisy")
    routing = mr.TopK(NUM_EXPERTS, 2)(noisy)
    assert_routing_equal(routing, reference_topk(to_numpy(noisy), 2))


def test_multiplicative_jitter(backend):
    values = np.random.default_rng(36).standard_normal((4, 6)).astype(np.float32)
    _, uniform = draws(values.shape, 37)
    jittered = mr.multiplicative_jitter(
        backend.asarray(values), backend.asarray(uniform), epsilon=0.1
    )
    assert_close(jittered, reference_multiplicative_jitter(values, uniform, 0.1), "jittered")
    ratio = to_numpy(jittered) / values
    assert np.all((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6))


GSHARD = [
    # GShard as published: random second expert, threshold 0.5, legacy renormalisation.
    pytest.param({}, id="random-0.5"),
    # Every second expert kept: plain top-2 with renormalised gates.
    pytest.param({"second_expert_policy": "all"}, id="all"),
    # Raw gates (no legacy renormalisation) decide and weigh.
    pytest.param({"normalize": False}, id="raw-gates"),
    # A high threshold drops most second experts.
    pytest.param({"second_expert_threshold": 2.0}, id="threshold-2"),
    # Capacity 2N/E: first choices fill buffers first; dropped second choices take no room.
    pytest.param({"capacity_factor": 1.0}, id="capacity"),
    # Capacity with batch prioritised routing and a minimum capacity.
    pytest.param(
        {"capacity_factor": 0.25, "min_capacity": 3, "drop_policy": "batch_priority"},
        id="capacity-bpr",
    ),
]


@pytest.mark.parametrize("options", GSHARD)
def test_gshard_top2(backend, options):
    logits = edge_case_logits(2, 16, NUM_EXPERTS, seed=38)
    _, uniform = draws(logits.shape[:-1], 39)
    policy = options.get("second_expert_policy", "random")
    router = mr.GShardTop2(num_experts=NUM_EXPERTS, **options)
    routing = router(
        backend.asarray(logits), backend.asarray(uniform) if policy == "random" else None
    )
    expected = reference_gshard_top2(logits, uniform if policy == "random" else None, **options)
    assert_routing_equal(routing, expected)


def test_gshard_all_is_topk2(backend):
    # Invariant: without the random drop, GShard top-2 is renormalised softmax top-2.
    logits = backend.asarray(edge_case_logits(2, 16, NUM_EXPERTS, seed=40))
    gshard = mr.GShardTop2(NUM_EXPERTS, second_expert_policy="all", capacity_factor=0.8)(logits)
    topk = mr.TopK(NUM_EXPERTS, 2, capacity_factor=0.8)(logits)
    assert_routing_equal(gshard, topk)


def test_gshard_keep_rate_follows_the_gate(backend):
    # Over many draws a second expert with normalised gate g2 is kept with probability
    # min(1, g2 / 0.5): here logits [1, 0, ...] give g2 = 1 / (1 + e).
    logits = np.zeros((4000, 4), np.float32)
    logits[:, 0] = 1.0
    _, uniform = draws((4000,), 41)
    routing = mr.GShardTop2(4)(backend.asarray(logits), backend.asarray(uniform))
    kept = np.mean(to_numpy(routing.expert_ids).reshape(4000, 2)[:, 1] >= 0)
    assert abs(kept - 2.0 / (1.0 + np.e)) < 0.03


def test_noise_errors(backend):
    logits = backend.asarray(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="normal"):  # wrong shape
        mr.vmoe_logit_noise(logits, backend.asarray(np.zeros((3, 3), np.float32)))
    with pytest.raises(ValueError, match="noise_std"):
        mr.vmoe_logit_noise(logits, logits, noise_std=-1.0)
    with pytest.raises(TypeError, match="normal"):  # integer draws
        mr.gaussian_noise(logits, backend.asarray(np.zeros((3, 4), np.int32)), 1.0)
    with pytest.raises(ValueError, match="uniform"):
        mr.multiplicative_jitter(logits, backend.asarray(np.zeros((4,), np.float32)))
    with pytest.raises(ValueError, match="epsilon"):
        mr.multiplicative_jitter(logits, logits, epsilon=float("nan"))
    with pytest.raises(TypeError, match="noise_logits"):
        mr.noisy_top_k_std([0.0, 1.0])


def test_gshard_errors(backend):
    logits = backend.asarray(np.zeros((3, 4), np.float32))
    router = mr.GShardTop2(4)
    with pytest.raises(ValueError, match="uniform"):  # random policy needs draws
        router(logits)
    with pytest.raises(ValueError, match="uniform"):  # one draw per token
        router(logits, backend.asarray(np.zeros((3, 4), np.float32)))
    with pytest.raises(TypeError, match="uniform"):
        router(logits, backend.asarray(np.zeros(3, np.int32)))
    with pytest.raises(ValueError, match="uniform"):  # "all" takes no draws
        mr.GShardTop2(4, second_expert_policy="all")(logits, backend.asarray(np.zeros(3)))
    with pytest.raises(ValueError, match="num_experts"):
        mr.GShardTop2(1)
    with pytest.raises(ValueError, match="second_expert_threshold"):
        mr.GShardTop2(4, second_expert_threshold=0.0)
    with pytest.raises(ValueError, match="second_expert_policy"):
        mr.GShardTop2(4, second_expert_policy="sampling")
