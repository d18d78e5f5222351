"""Losses and statistics against hand-computed values, padding, gradients, tracing and errors.

The cross-backend comparison with the float64 references is in
``tests/losses/test_losses_stats.py``; here each formula is checked on cases small enough to
work out by hand, a padded batch is compared with the same batch unpadded, gradients are compared
with central finite differences of dense float64 formulas (the routing decision held fixed), and
every function runs under ``jax.jit`` and ``torch.compile``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import moerouter as mr
from moerouter.losses import _erfc, _normal_cdf
from moerouter.testing import (
    Backend,
    assert_close,
    edge_case_logits,
    reference_normal_cdf,
    to_numpy,
)

# --------------------------------------------------------------------------------------------
# The normal CDF the load loss needs (the array API has no erf).
# --------------------------------------------------------------------------------------------


def test_normal_cdf_accuracy():
    # Float32 inputs over the range where Φ is representable: absolute error at float32
    # resolution everywhere, and relative error in the lower tail that grows only as x² u
    # (the rounding of x² inside exp), not catastrophically.
    x = np.linspace(-13.0, 8.0, 20001).astype(np.float32)
    ours = _normal_cdf(x, xp=np).astype(np.float64)
    exact = np.array([reference_normal_cdf(float(v)) for v in x])
    assert np.max(np.abs(ours - exact)) <= 3e-7
    relative = np.abs(ours - exact) / exact
    assert np.all(relative <= 2.5e-7 * (4.0 + x.astype(np.float64) ** 2))
    z = np.linspace(-6.0, 6.0, 4001).astype(np.float32)
    erfc_exact = np.array([math.erfc(float(v)) for v in z])
    assert np.max(np.abs(_erfc(z, xp=np) - erfc_exact) / erfc_exact) <= 5e-6
    # The limits are exact: no NaN from inf inputs.
    limits = _normal_cdf(np.asarray([-np.inf, np.inf], np.float32), xp=np)
    np.testing.assert_array_equal(limits, [0.0, 1.0])


# --------------------------------------------------------------------------------------------
# Hand-computed values.
# --------------------------------------------------------------------------------------------

SIG1, SIG2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))  # softmax([1, 0])[0], ([2, 0])[0]


def test_load_balancing_by_hand():
    # Two tokens both choosing expert 0: f = (1, 0) under every convention with k = 1, so the
    # loss is E * P_0 with P_0 the mean of softmax([1, 0])_0 and softmax([2, 0])_0.
    routing = mr.TopK(num_experts=2, k=1)(np.float32([[1.0, 0.0], [2.0, 0.0]]))
    expected = 2 * (SIG1 + SIG2) / 2
    for convention in ("megatron", "mixtral", "gshard"):
        loss = mr.losses.load_balancing(routing, convention=convention)
        assert_close(loss, expected, convention, rtol=1e-6)
    # k = 2 of E = 2: every token chooses both; megatron f = (1/2, 1/2) -> 1, mixtral f = (1, 1)
    # -> 2 (= k).
    routing = mr.TopK(num_experts=2, k=2)(np.float32([[1.0, 0.0], [2.0, 0.0]]))
    assert_close(mr.losses.load_balancing(routing), 1.0, "megatron k=2", rtol=1e-6)
    assert_close(
        mr.losses.load_balancing(routing, convention="mixtral"), 2.0, "mixtral k=2", rtol=1e-6
    )


def test_sigmoid_scores_are_normalised():
    # Sigmoid scores do not sum to 1; the Switch loss uses them normalised per token
    # (Megatron-Core), so a balanced sigmoid routing gives exactly 1, not E * mean(sigmoid).
    routing = mr.TopK(num_experts=2, k=1, score="sigmoid")(np.float32([[1.0, 0.0], [0.0, 1.0]]))
    assert_close(mr.losses.load_balancing(routing), 1.0, "sigmoid", rtol=1e-6)


def test_sequence_load_balancing_by_hand():
    # Sequence 0 is balanced (loss 1); sequence 1 sends both tokens to expert 0:
    # f = E * c / (k T) = (2, 0), P_0 = (SIG1 + SIG1) / 2, so its loss is 2 * SIG1.
    logits = np.float32([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    routing = mr.TopK(num_experts=2, k=1)(logits)
    expected = (1.0 + 2 * SIG1) / 2
    assert_close(mr.losses.sequence_load_balancing(routing), expected, "seq", rtol=1e-6)
    loss = mr.losses.sequence_load_balancing(routing, alpha=1e-4)
    assert_close(loss, 1e-4 * expected, "seq alpha", rtol=1e-6)
    # Masking the second token of sequence 1 leaves T_1 = 1: f = (2, 0), P_0 = SIG1.
    mask = np.asarray([[True, True], [True, False]])
    loss = mr.losses.sequence_load_balancing(routing, mask=mask)
    assert_close(loss, (1.0 + 2 * SIG1) / 2, "seq masked", rtol=1e-6)


def test_importance_loss_by_hand():
    # Weights (k = 1, renormalised): every gate is 1, importance = (2, 0): CV² = 1 = E - 1.
    routing = mr.TopK(num_experts=2, k=1)(np.float32([[1.0, 0.0], [2.0, 0.0]]))
    assert_close(mr.losses.importance_loss(routing), 1.0, "weights", rtol=1e-6)
    # Probabilities: importance = (SIG1 + SIG2, 2 - SIG1 - SIG2); CV² = ((a - b) / (a + b))².
    a, b = SIG1 + SIG2, 2 - SIG1 - SIG2
    loss = mr.losses.importance_loss(routing, source="probs")
    assert_close(loss, ((a - b) / (a + b)) ** 2, "probs", rtol=1e-5)
    # Balanced routing: zero.
    balanced = mr.TopK(num_experts=2, k=1)(np.float32([[1.0, 0.0], [0.0, 1.0]]))
    assert_close(mr.losses.importance_loss(balanced), 0.0, "balanced", atol=1e-7)


def test_load_loss_by_hand():
    # One token, E = 2, k = 1, clean logits 0, noisy (1, 0), std 1. Shazeer: expert 0 is in the
    # top-1, its threshold is the 2nd noisy value 0: Φ(0) = 1/2; expert 1 is out, its threshold
    # is the 1st noisy value 1: Φ(-1). V-MoE: threshold 1 for both: Φ(-1) twice, CV² = 0.
    clean, noisy = np.float32([[0.0, 0.0]]), np.float32([[1.0, 0.0]])
    load = np.array([0.5, reference_normal_cdf(-1.0)])
    expected = load.var() / (load.mean() ** 2 + 1e-10)
    assert_close(mr.losses.load_loss(clean, noisy, 1.0, k=1), expected, "shazeer", rtol=1e-5)
    loss = mr.losses.load_loss(clean, noisy, 1.0, k=1, threshold="vmoe")
    assert_close(loss, 0.0, "vmoe", atol=1e-7)
    # Zero noise: the indicator; only expert 0 clears its threshold (0 > 0 is false, so none).
    assert_close(mr.losses.load_loss(clean, noisy, 0.0, k=1), 0.0, "zero std", atol=1e-7)
    clean = np.float32([[1.0, 0.0]])
    assert_close(mr.losses.load_loss(clean, noisy, 0.0, k=1), 1.0, "zero std hard", rtol=1e-6)


def test_entropy_by_hand():
    # Uniform rows: log E each; one certain row (probability ~1) adds ~0 to the sum.
    routing = mr.TopK(num_experts=4, k=1)(np.zeros((3, 4), np.float32))
    assert_close(mr.losses.entropy(routing), math.log(4), "uniform", rtol=1e-6)
    logits = np.float32([[0.0, 0.0, 0.0, 0.0], [200.0, 0.0, 0.0, 0.0]])
    routing = mr.TopK(num_experts=4, k=1)(logits)
    assert_close(mr.losses.entropy(routing), math.log(4) / 2, "half certain", rtol=1e-6)
    mask = np.asarray([False, True])
    assert_close(mr.losses.entropy(routing, mask=mask), 0.0, "masked", atol=1e-7)
    # The same number as stats.summary's router_entropy.
    summary = mr.stats.summary(routing)
    assert_close(mr.losses.entropy(routing), summary["router_entropy"], "summary", rtol=1e-6)


def test_z_loss_mask_by_hand():
    # Row 0: (log 2)², row 1: (log(e + 1))²; masking row 1 leaves (log 2)².
    logits = np.float32([[0.0, 0.0], [1.0, 0.0]])
    both = (math.log(2) ** 2 + math.log(math.e + 1) ** 2) / 2
    assert_close(mr.losses.z_loss(logits), both, "both", rtol=1e-6)
    loss = mr.losses.z_loss(logits, mask=np.asarray([True, False]))
    assert_close(loss, math.log(2) ** 2, "masked", rtol=1e-6)


def test_co_occurrence_and_at_least_by_hand():
    # Token 0 -> experts {0, 1}, token 1 -> {0, 2}, token 2 -> {1, 0}.
    logits = np.float32([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    routing = mr.TopK(num_experts=3, k=2)(logits)
    expected = np.array([[3, 2, 1], [2, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(to_numpy(mr.stats.co_occurrence(routing)), expected)
    masked = mr.stats.co_occurrence(routing, mask=np.asarray([True, False, True]))
    np.testing.assert_array_equal(to_numpy(masked), [[2, 2, 0], [2, 2, 0], [0, 0, 0]])
    np.testing.assert_allclose(to_numpy(mr.stats.processed_by_at_least(routing)), [1, 1, 1])
    # Expert choice, C = 2 of 4 tokens per expert: token 0 is taken by both experts (0.5 ties
    # go to the lower token index), tokens 1 and 2 by one each, token 3 by none.
    logits = np.float32([[3.0, 3.0], [3.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    routing = mr.ExpertChoice(num_experts=2, capacity_factor=1.0)(logits)
    ratios = mr.stats.processed_by_at_least(routing)
    np.testing.assert_allclose(to_numpy(ratios), [1.0, 0.75, 0.25])
    picked = mr.stats.processed_by_at_least(routing, thresholds=[2, 1])
    np.testing.assert_allclose(to_numpy(picked), [0.25, 0.75])
    np.testing.assert_array_equal(to_numpy(mr.stats.co_occurrence(routing)), [[2, 1], [1, 2]])
    summary = mr.stats.summary(routing)
    np.testing.assert_allclose(to_numpy(summary["processed_by_at_least"]), [1.0, 0.75, 0.25])


def test_aggregate():
    a, b = np.float32(1.0), np.float32(3.0)
    assert float(mr.losses.aggregate([a, b])) == 2.0
    assert float(mr.losses.aggregate([a, b], reduction="sum")) == 4.0
    # Weighted mean: (1 * 1 + 3 * 3) / 4.
    assert float(mr.losses.aggregate([a, b], weights=[1.0, 3.0])) == 2.5
    assert float(mr.losses.aggregate([a, b], weights=[1.0, 3.0], reduction="sum")) == 10.0
    layers = [{"aux": a, "z": b}, {"z": a, "aux": b}]
    out = mr.losses.aggregate(layers, reduction="sum")
    assert {key: float(value) for key, value in out.items()} == {"aux": 4.0, "z": 4.0}


def test_state_reproduces_mixtral_over_concatenated_layers():
    # transformers' Mixtral loss takes all layers' logits concatenated along tokens: accumulating
    # every layer's routing into one state gives that number (here checked against the formula
    # on the concatenated logits, computed in float64).
    rng = np.random.default_rng(30)
    layers = [rng.standard_normal((8, 4)).astype(np.float32) for _ in range(3)]
    router = mr.TopK(num_experts=4, k=2)
    state = mr.losses.balance_state_init(4, xp=np)
    for logits in layers:
        state = mr.losses.accumulate(state, router(logits))
    everything = np.concatenate(layers).astype(np.float64)
    probs = np.exp(everything) / np.exp(everything).sum(axis=1, keepdims=True)
    chosen = np.argsort(-everything, axis=1, kind="stable")[:, :2]
    expert_mask = np.eye(4)[chosen]  # (T, k, E)
    tokens_per_expert = expert_mask.mean(axis=0)  # (k, E), as transformers computes it
    expected = 4 * np.sum(tokens_per_expert * probs.mean(axis=0))
    loss = mr.losses.load_balancing_from_state(state, convention="mixtral")
    assert_close(loss, expected, "mixtral over layers", rtol=1e-6)
    # The per-layer mean is a different number (the reason aggregate is not used for this).
    per_layer = [mr.losses.load_balancing(router(x), convention="mixtral") for x in layers]
    assert abs(float(mr.losses.aggregate(per_layer)) - expected) > 1e-4


def test_global_loss_takes_local_probabilities():
    # Megatron's global_aux_loss: f from the accumulated counts, P from this micro-batch.
    router = mr.TopK(num_experts=4, k=1)
    rng = np.random.default_rng(31)
    first, second = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2))
    state = mr.losses.balance_state_init(4, xp=np)
    state = mr.losses.accumulate(state, router(first))
    state = mr.losses.accumulate(state, router(second))
    local = router(second)
    counts = to_numpy(state.counts).astype(np.float64)
    expected = 4 * np.sum(counts / counts.sum() * to_numpy(local.probs).mean(axis=0))
    loss = mr.losses.load_balancing_from_state(state, routing=local)
    assert_close(loss, expected, "global f, local P", rtol=1e-6)


# --------------------------------------------------------------------------------------------
# A padded batch equals the unpadded batch.
# --------------------------------------------------------------------------------------------


# JAX is left out here: its eager mode compiles every operation once per shape (a minute of this
# test on a busy 2-core machine); its masked values are checked against the references in
# tests/losses/test_losses_stats.py and under jax.jit below.
EAGER_BACKENDS = [
    # The agnostic path on NumPy arrays.
    pytest.param(Backend.NUMPY, id="numpy"),
    # The strict namespace: no implicit casts or NumPy-only idioms in the masking.
    pytest.param(Backend.ARRAY_API_STRICT, id="array_api_strict"),
    # torch through array-api-compat.
    pytest.param(Backend.TORCH, id="torch"),
]


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_padding_mask_equals_unpadded(backend):
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    # (G, S) real tokens, then P padding tokens per sequence holding large garbage logits. Top-k
    # without capacity decides each token alone, so the real tokens route the same way.
    rng = np.random.default_rng(32)
    real = (2 * rng.standard_normal((2, 7, 6))).astype(np.float32)
    padding = (50 * rng.standard_normal((2, 3, 6))).astype(np.float32)
    padded = np.concatenate([real, padding], axis=1)
    mask = np.concatenate([np.ones((2, 7), bool), np.zeros((2, 3), bool)], axis=1)
    router = mr.NullExperts(num_experts=4, num_null=2, k=2)
    short, long = router(backend.asarray(real)), router(backend.asarray(padded))
    device_mask = backend.asarray(mask)

    def pairs():
        for convention in ("megatron", "mixtral", "gshard"):
            yield (
                f"load_balancing[{convention}]",
                mr.losses.load_balancing(short, convention=convention),
                mr.losses.load_balancing(long, convention=convention, mask=device_mask),
            )
            yield (
                f"null_load_balancing[{convention}]",
                mr.losses.null_load_balancing(short, convention=convention),
                mr.losses.null_load_balancing(long, convention=convention, mask=device_mask),
            )
        yield (
            "sequence_load_balancing",
            mr.losses.sequence_load_balancing(short),
            mr.losses.sequence_load_balancing(long, mask=device_mask),
        )
        for source in ("weights", "probs"):
            yield (
                f"importance_loss[{source}]",
                mr.losses.importance_loss(short, source=source),
                mr.losses.importance_loss(long, source=source, mask=device_mask),
            )
        yield "entropy", mr.losses.entropy(short), mr.losses.entropy(long, mask=device_mask)
        yield (
            "z_loss",
            mr.losses.z_loss(backend.asarray(real)),
            mr.losses.z_loss(backend.asarray(padded), mask=device_mask),
        )
        noisy_real = real + 0.3 * rng.standard_normal(real.shape).astype(np.float32)
        noisy_padded = np.concatenate([noisy_real, padding], axis=1)
        yield (
            "load_loss",
            mr.losses.load_loss(backend.asarray(real), backend.asarray(noisy_real), 0.3, k=2),
            mr.losses.load_loss(
                backend.asarray(padded),
                backend.asarray(noisy_padded),
                0.3,
                k=2,
                mask=device_mask,
            ),
        )
        yield (
            "co_occurrence",
            mr.stats.co_occurrence(short),
            mr.stats.co_occurrence(long, mask=device_mask),
        )
        yield (
            "processed_by_at_least",
            mr.stats.processed_by_at_least(short),
            mr.stats.processed_by_at_least(long, mask=device_mask),
        )

    for name, unpadded, masked in pairs():
        # Same terms, summed in a different order: float32 rounding only.
        assert_close(masked, to_numpy(unpadded), name, rtol=2.0**-18, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Gradients: autograd against central differences of dense float64 formulas.
# --------------------------------------------------------------------------------------------

NUM_TOKENS, NUM_EXPERTS, K = 6, 4, 2
LOGITS = np.random.default_rng(33).standard_normal((NUM_TOKENS, NUM_EXPERTS)).astype(np.float32)
NOISY = (LOGITS + 0.5 * np.random.default_rng(34).standard_normal(LOGITS.shape)).astype(np.float32)
STD = (0.3 + np.random.default_rng(35).random(LOGITS.shape)).astype(np.float32)
ROUTER = mr.TopK(num_experts=NUM_EXPERTS, k=K)
CHOICES = np.argsort(-LOGITS, axis=1, kind="stable")[:, :K]  # the decision, held fixed
COUNTS = np.eye(NUM_EXPERTS)[CHOICES].sum(axis=(0, 1))


def softmax64(values):
    exp = np.exp(values - values.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def cv_squared64(values):
    return values.var() / (values.mean() ** 2 + 1e-10)


def dense_load_loss(clean, noisy, std):
    ranked = -np.sort(-noisy, axis=1)
    theta = np.where(noisy > ranked[:, K : K + 1], ranked[:, K : K + 1], ranked[:, K - 1 : K])
    cdf = np.vectorize(reference_normal_cdf)((clean - theta) / std)
    return cv_squared64(cdf.sum(axis=0))


def dense_importance_weights(logits):
    chosen = np.take_along_axis(logits, CHOICES, axis=1)
    weights = softmax64(chosen)
    importance = np.zeros(NUM_EXPERTS)
    for t in range(NUM_TOKENS):
        for slot in range(K):
            importance[CHOICES[t, slot]] += weights[t, slot]
    return cv_squared64(importance)


# name -> (loss of logits with the library, float64 loss of logits with the decision fixed)
DIFFERENTIABLE = {
    # Megatron convention: f fixed from the decision, P = mean softmax.
    "load_balancing": (
        lambda logits: mr.losses.load_balancing(ROUTER(logits)),
        lambda v: NUM_EXPERTS * np.sum(COUNTS / COUNTS.sum() * softmax64(v).mean(axis=0)),
    ),
    # The state's loss: the gradient flows through the accumulated probability sums.
    "load_balancing_from_state": (
        lambda logits: mr.losses.load_balancing_from_state(
            mr.losses.accumulate(
                mr.losses.balance_state_init(NUM_EXPERTS, xp=_namespace(logits)), ROUTER(logits)
            )
        ),
        lambda v: NUM_EXPERTS * np.sum(COUNTS / COUNTS.sum() * softmax64(v).mean(axis=0)),
    ),
    # Megatron's global form: counts from the state, P (and the gradient) from the routing.
    "load_balancing_from_state_local": (
        lambda logits: mr.losses.load_balancing_from_state(
            mr.losses.accumulate(
                mr.losses.balance_state_init(NUM_EXPERTS, xp=_namespace(logits)),
                ROUTER(logits),
            ),
            routing=ROUTER(logits),
        ),
        lambda v: NUM_EXPERTS * np.sum(COUNTS / COUNTS.sum() * softmax64(v).mean(axis=0)),
    ),
    # Two sequences of three tokens: per-sequence f and P.
    "sequence_load_balancing": (
        lambda logits: mr.losses.sequence_load_balancing(
            ROUTER(logits.reshape((2, 3, NUM_EXPERTS)))
        ),
        lambda v: np.mean(
            [
                np.sum(
                    NUM_EXPERTS
                    * np.eye(NUM_EXPERTS)[CHOICES[3 * g : 3 * g + 3]].sum(axis=(0, 1))
                    / (K * 3)
                    * softmax64(v[3 * g : 3 * g + 3]).mean(axis=0)
                )
                for g in range(2)
            ]
        ),
    ),
    # Importance over the full probabilities (V-MoE).
    "importance_probs": (
        lambda logits: mr.losses.importance_loss(ROUTER(logits), source="probs"),
        lambda v: cv_squared64(softmax64(v).sum(axis=0)),
    ),
    # Importance over the renormalised top-k gates (Shazeer).
    "importance_weights": (
        lambda logits: mr.losses.importance_loss(ROUTER(logits)),
        dense_importance_weights,
    ),
    "entropy": (
        lambda logits: mr.losses.entropy(ROUTER(logits)),
        lambda v: np.mean(-np.sum(softmax64(v) * np.log(softmax64(v)), axis=1)),
    ),
    "z_loss": (
        lambda logits: mr.losses.z_loss(logits),
        lambda v: np.mean((np.log(np.exp(v).sum(axis=1))) ** 2),
    ),
    # Shazeer's load loss through the clean logits (noisy logits and std held fixed).
    "load_loss": (
        lambda logits: mr.losses.load_loss(logits, _like(logits, NOISY), _like(logits, STD), k=K),
        lambda v: dense_load_loss(v, NOISY.astype(np.float64), STD.astype(np.float64)),
    ),
}


def _like(reference, values):
    # A constant array on the backend of ``reference``.
    from array_api_compat import array_namespace

    return array_namespace(reference).asarray(values)


def finite_difference(function, point, step=1e-6):
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        up, down = point.copy(), point.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (function(up) - function(down)) / (2 * step)
    return grad


GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("name", list(DIFFERENTIABLE))
def test_torch_gradients(name):
    torch = pytest.importorskip("torch")
    library, dense = DIFFERENTIABLE[name]
    logits = torch.asarray(LOGITS).requires_grad_()
    library(logits).backward()
    expected = finite_difference(dense, LOGITS.astype(np.float64))
    np.testing.assert_allclose(to_numpy(logits.grad), expected, **GRAD_TOL)


@pytest.mark.parametrize("name", list(DIFFERENTIABLE))
def test_jax_gradients(name):
    jax = pytest.importorskip("jax")
    library, dense = DIFFERENTIABLE[name]
    grad = jax.grad(library)(jax.numpy.asarray(LOGITS))
    expected = finite_difference(dense, LOGITS.astype(np.float64))
    np.testing.assert_allclose(np.asarray(grad), expected, **GRAD_TOL)


def test_load_loss_gradients_to_noise_inputs():
    # Shazeer's loss trains the noise network through σ, and the noisy logits carry the
    # threshold: both get the finite-difference gradient.
    torch = pytest.importorskip("torch")
    noisy = torch.asarray(NOISY).requires_grad_()
    std = torch.asarray(STD).requires_grad_()
    mr.losses.load_loss(torch.asarray(LOGITS), noisy, std, k=K).backward()
    clean = LOGITS.astype(np.float64)
    expected_noisy = finite_difference(
        lambda v: dense_load_loss(clean, v, STD.astype(np.float64)), NOISY.astype(np.float64)
    )
    expected_std = finite_difference(
        lambda v: dense_load_loss(clean, NOISY.astype(np.float64), v), STD.astype(np.float64)
    )
    np.testing.assert_allclose(to_numpy(noisy.grad), expected_noisy, **GRAD_TOL)
    np.testing.assert_allclose(to_numpy(std.grad), expected_std, **GRAD_TOL)


# --------------------------------------------------------------------------------------------
# Tracing: jax.jit and torch.compile give the eager values.
# --------------------------------------------------------------------------------------------


def every_loss_and_stat(logits, noisy, mask):
    routing = mr.NullExperts(num_experts=4, num_null=4, k=2)(logits)
    grouped = mr.TopK(num_experts=8, k=2)(logits)
    state = mr.losses.accumulate(
        mr.losses.balance_state_init(8, xp=_namespace(logits)), grouped, mask=mask
    )
    return {
        "load_balancing": mr.losses.load_balancing(routing, convention="gshard", mask=mask),
        "null_load_balancing": mr.losses.null_load_balancing(routing, mask=mask),
        "sequence": mr.losses.sequence_load_balancing(grouped, mask=mask),
        "importance": mr.losses.importance_loss(routing, mask=mask),
        "load": mr.losses.load_loss(logits, noisy, 0.5, k=2, mask=mask),
        "entropy": mr.losses.entropy(routing, mask=mask),
        "z": mr.losses.z_loss(logits, mask=mask),
        "state": mr.losses.load_balancing_from_state(state),
        "state_local": mr.losses.load_balancing_from_state(state, routing=grouped, mask=mask),
        "aggregate": mr.losses.aggregate(
            [mr.losses.z_loss(logits), mr.losses.entropy(routing)], weights=[1.0, 2.0]
        ),
        "co_occurrence": mr.stats.co_occurrence(routing, mask=mask),
        "at_least": mr.stats.processed_by_at_least(routing, thresholds=[0, 2], mask=mask),
    }


def _namespace(array):
    from array_api_compat import array_namespace

    return array_namespace(array)


TRACE_LOGITS = edge_case_logits(2, 16, 8, seed=36)
TRACE_NOISY = np.nan_to_num(TRACE_LOGITS, nan=0.0, posinf=0.0) + np.float32(0.5)
TRACE_MASK = np.random.default_rng(37).random((2, 16)) < 0.8


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")


def test_jax_jit_equals_eager(reference_backend):
    jax = pytest.importorskip("jax")
    pytest.importorskip("moerouter_jax")
    args = [jax.numpy.asarray(a) for a in (TRACE_LOGITS, TRACE_NOISY, TRACE_MASK)]
    eager = every_loss_and_stat(*args)
    jitted = jax.jit(every_loss_and_stat)(*args)
    for name, value in eager.items():
        assert_close(jitted[name], value, name, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_equals_eager(reference_backend):
    torch = pytest.importorskip("torch")
    args = [torch.asarray(a) for a in (TRACE_LOGITS, TRACE_NOISY, TRACE_MASK)]
    eager = every_loss_and_stat(*args)
    compiled = torch.compile(every_loss_and_stat, backend="aot_eager", fullgraph=True)(*args)
    for name, value in eager.items():
        assert_close(compiled[name], value, name, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Bad input: errors name the parameter.
# --------------------------------------------------------------------------------------------


def test_errors():
    routing = ROUTER(LOGITS)
    state = mr.losses.balance_state_init(NUM_EXPERTS, xp=np)
    cases = [
        # A mask of the wrong length, dtype or type.
        (
            ValueError,
            "mask must have shape",
            lambda: mr.losses.load_balancing(routing, mask=np.ones(5, bool)),
        ),
        (
            TypeError,
            "mask must have dtype bool",
            lambda: mr.losses.entropy(routing, mask=np.ones(NUM_TOKENS)),
        ),
        (
            TypeError,
            "mask must be a bool array",
            lambda: mr.losses.z_loss(LOGITS, mask=[True] * NUM_TOKENS),
        ),
        (
            ValueError,
            "mask must have shape",
            lambda: mr.stats.co_occurrence(routing, mask=np.ones((2, 3), bool)),
        ),
        # Options outside their sets.
        (
            ValueError,
            "source must be one of",
            lambda: mr.losses.importance_loss(routing, source="gates"),
        ),
        (
            ValueError,
            "threshold must be one of",
            lambda: mr.losses.load_loss(LOGITS, NOISY, 1.0, k=1, threshold="t2t"),
        ),
        (
            ValueError,
            "reduction must be one of",
            lambda: mr.losses.aggregate([LOGITS[0, 0]], reduction="max"),
        ),
        (
            ValueError,
            "convention must be one of",
            lambda: mr.losses.load_balancing_from_state(state, convention="gshard"),
        ),
        # load_loss shapes, k and noise.
        (ValueError, "k must be <= 3", lambda: mr.losses.load_loss(LOGITS, NOISY, 1.0, k=4)),
        (
            ValueError,
            "noisy_logits must have the shape",
            lambda: mr.losses.load_loss(LOGITS, NOISY[:2], 1.0, k=1),
        ),
        (
            ValueError,
            "noise_std must be a number, a 0-d array",
            lambda: mr.losses.load_loss(LOGITS, NOISY, STD[:2], k=1),
        ),
        (
            ValueError,
            "noise_std must be >= 0",
            lambda: mr.losses.load_loss(LOGITS, NOISY, -1.0, k=1),
        ),
        (
            TypeError,
            "noise_std must be a number or an array",
            lambda: mr.losses.load_loss(LOGITS, NOISY, "1", k=1),
        ),
        (TypeError, "k must be an int", lambda: mr.losses.load_loss(LOGITS, NOISY, 1.0, k=1.0)),
        # Sequence loss on expert choice; alpha not a number.
        (
            ValueError,
            "needs a token-choice routing",
            lambda: mr.losses.sequence_load_balancing(
                mr.ExpertChoice(num_experts=NUM_EXPERTS)(LOGITS)
            ),
        ),
        (
            TypeError,
            "alpha must be a finite number",
            lambda: mr.losses.sequence_load_balancing(routing, alpha="1"),
        ),
        # State: wrong object, wrong width, namespace missing.
        (
            TypeError,
            "state must be a moerouter.losses.BalanceState",
            lambda: mr.losses.accumulate({"counts": None}, routing),
        ),
        (
            ValueError,
            "state has 8 columns",
            lambda: mr.losses.accumulate(mr.losses.balance_state_init(8, xp=np), routing),
        ),
        (
            TypeError,
            "xp must be an array namespace",
            lambda: mr.losses.balance_state_init(4, xp=None),
        ),
        (ValueError, "num_choices must be >= 1", lambda: mr.losses.balance_state_init(0, xp=np)),
        (
            ValueError,
            "mask applies to routing",
            lambda: mr.losses.load_balancing_from_state(state, mask=np.ones(NUM_TOKENS, bool)),
        ),
        # aggregate: empty, lengths, mixed kinds, keys.
        (ValueError, "per_layer must hold at least one layer", lambda: mr.losses.aggregate([])),
        (
            ValueError,
            "weights has 1 entries",
            lambda: mr.losses.aggregate([LOGITS[0, 0], LOGITS[0, 1]], weights=[1.0]),
        ),
        (
            ValueError,
            "weights must be finite and >= 0",
            lambda: mr.losses.aggregate([LOGITS[0, 0]], weights=[-1.0]),
        ),
        (
            TypeError,
            "only arrays or only dicts",
            lambda: mr.losses.aggregate([{"a": LOGITS[0, 0]}, LOGITS[0, 0]]),
        ),
        (
            ValueError,
            r"per_layer\[1\] has keys",
            lambda: mr.losses.aggregate([{"a": LOGITS[0, 0]}, {"b": LOGITS[0, 0]}]),
        ),
        (TypeError, "per_layer must hold arrays", lambda: mr.losses.aggregate([1.0, 2.0])),
        # Stats thresholds.
        (
            ValueError,
            r"thresholds must lie in \[0, 2\]",
            lambda: mr.stats.processed_by_at_least(routing, thresholds=[3]),
        ),
        (
            TypeError,
            r"thresholds\[0\] must be an int, got float",
            lambda: mr.stats.processed_by_at_least(routing, thresholds=[1.5]),
        ),
        (TypeError, "routing must be a moerouter.Routing", lambda: mr.stats.co_occurrence(LOGITS)),
        (TypeError, "routing must be a moerouter.Routing", lambda: mr.losses.entropy(LOGITS)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


# --------------------------------------------------------------------------------------------
# The Examples sections run and print what they say (on array-api-strict).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        # Every loss, the global-batch state and aggregate.
        pytest.param(mr.losses, id="losses"),
        # summary, co_occurrence, processed_by_at_least.
        pytest.param(mr.stats, id="stats"),
    ],
)
def test_docstring_examples(module):
    pytest.importorskip("array_api_strict")
    import doctest

    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
