"""Scores stay finite, with finite gradients, at logits of +-100, +-1e4 and +-inf.

Every score function moerouter computes goes through one stable sigmoid / log-sigmoid /
softplus (:mod:`moerouter._numerics`) or a max-shifted softmax. The naive
``1 / (1 + exp(-x))`` has a NaN gradient below about -88.7 in float32 (issue 23), and dividing
tiny scores by their sum has one on JAX below about -44; one NaN poisons every parameter at the
next optimiser step. Values are checked on NumPy (and against float64), gradients on torch and
JAX, for every policy and every score option it has.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import moerouter as mr
from moerouter import _numerics
from moerouter.testing import Backend, to_numpy

INF = math.inf
EXTREMES = [-INF, -1e4, -100.0, -88.8, -30.0, -1.0, 0.0, 1.0, 30.0, 88.8, 100.0, 1e4, INF]
E = 8

# Rows of (T, 8) router logits, each with a reason.
ROWS = np.asarray(
    [
        [0.0, -100.0, 100.0, 1.0, 0.5, -0.5, 2.0, -2.0],  # +-100 beside ordinary logits
        [0.0, -1e4, 1e4, -1.0, 0.5, -0.5, 2.0, -2.0],  # +-1e4
        [0.0, -INF, 2.0, 1.0, -100.0, 100.0, -1e4, 0.3],  # a -inf column: never chosen
        [-100.0, -100.0, -1e4, -1e4, -100.0, -101.0, -102.0, -103.0],  # every score tiny
        [-50.0, -60.0, -55.0, -70.0, -52.0, -65.0, -58.0, -1e4],  # tiny, but finite scores
        [1e4, 1e4, 100.0, 100.0, 99.0, 98.0, 97.0, 96.0],  # saturated sigmoid, ties
        [0.0, INF, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0],  # +inf: a non-finite row, routed nowhere
        [-INF, -INF, -INF, -INF, -INF, -INF, -INF, 5.0],  # one finite column
    ],
    np.float32,
)
TOKENS = ROWS.shape[0]


def reference_sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def reference_softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


# --------------------------------------------------------------------------------------------
# The primitives: value against float64, gradient against the analytic derivative.

PRIMITIVES = {
    # name: (function, float64 value, float64 derivative)
    "sigmoid": (
        _numerics.sigmoid,
        reference_sigmoid,
        lambda x: reference_sigmoid(x) * reference_sigmoid(-x),
    ),
    "log_sigmoid": (
        _numerics.log_sigmoid,
        lambda x: -reference_softplus(-x),
        lambda x: reference_sigmoid(-x),
    ),
    "softplus": (_numerics.softplus, reference_softplus, reference_sigmoid),
}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.ARRAY_API_STRICT], ids=str)
def test_primitive_values_match_float64(name, backend):
    function, value, _ = PRIMITIVES[name]
    xp = backend.namespace()
    actual = to_numpy(function(xp.asarray(np.asarray(EXTREMES, np.float32)), xp=xp))
    expected = np.asarray([value(x) for x in EXTREMES], np.float64)
    # Relative to float32 where the value is a normal number; denormals at about 1e-44.
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-44)


def _grad_torch(function, values):
    import torch

    tensor = torch.tensor(values, requires_grad=True)
    function(tensor).sum().backward()
    return tensor.grad.numpy()


def _grad_jax(function, values):
    import jax
    import jax.numpy as jnp

    return np.asarray(jax.grad(lambda v: jnp.sum(function(v)))(jnp.asarray(values)))


GRADIENTS = {"torch": _grad_torch, "jax": _grad_jax}


def _namespace(framework):
    pytest.importorskip(framework)
    return Backend(framework).namespace()


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@pytest.mark.parametrize("framework", sorted(GRADIENTS))
def test_primitive_gradients_are_the_derivative(name, framework):
    function, _, derivative = PRIMITIVES[name]
    xp = _namespace(framework)
    grad = GRADIENTS[framework](lambda v: function(v, xp=xp), np.asarray(EXTREMES, np.float32))
    expected = np.asarray([derivative(x) for x in EXTREMES])
    assert np.isfinite(grad).all(), grad
    # Exact at 0 too: no abs/min/max whose gradient splits or vanishes there. XLA on CPU flushes
    # denormal results to zero: allow the smallest normal float32.
    np.testing.assert_allclose(grad, expected, rtol=2e-6, atol=np.finfo(np.float32).tiny)


@pytest.mark.parametrize("framework", sorted(GRADIENTS))
def test_issue_23_sigmoid_top_k_gradient_is_not_nan(framework):
    # The reported case: a logit of -100 in a column the token did not pick.
    xp = _namespace(framework)
    router = mr.TopK(2, 1, score="sigmoid", normalize=False)
    grad = GRADIENTS[framework](
        lambda v: xp.sum(router(v).weights), np.asarray([[0.0, -100.0]], np.float32)
    )
    np.testing.assert_array_equal(grad, [[0.25, 0.0]])


@pytest.mark.parametrize("framework", sorted(GRADIENTS))
def test_renormalised_tiny_sigmoid_scores_keep_the_softmax_gradient(framework):
    # sigma(l_j) / sum sigma(l_i) of two logits far below 0 is softmax(l) over them: the
    # division of two denormal-sized sums must not turn that gradient into NaN or 0.
    xp = _namespace(framework)
    logits = np.asarray([[-50.0, -60.0, -55.0, -70.0]], np.float32)
    coefficients = xp.asarray([1.0, 2.0])
    for router in (mr.TopK(4, 2, score="sigmoid"), mr.DeepSeekTopK(4, 2)):
        grad = GRADIENTS[framework](
            lambda v, router=router: xp.sum(router(v).weights * coefficients), logits
        )
        first = 1.0 / (1.0 + math.exp(-5.0))  # softmax([-50, -55])[0]
        slope = first * (1.0 - first)
        np.testing.assert_allclose(grad, [[-slope, 0.0, slope, 0.0]], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Every policy and every score option it has.

NODES = np.asarray([0, 1, 0, 1, 0, 1, 0, 1], np.int32)
ANCHORS = np.asarray([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
BIAS = np.linspace(-0.3, 0.3, E).astype(np.float32)

POLICIES = {
    # TopK, every score: softmax renormalised (Mixtral), raw (Switch), over the chosen only,
    # sigmoid renormalised (DeepSeek-V3 without bias) and raw.
    "topk-softmax": lambda xp: mr.TopK(E, 2),
    "topk-softmax-raw": lambda xp: mr.TopK(E, 2, normalize=False),
    "topk-softmax-after-topk": lambda xp: mr.TopK(E, 2, softmax_after_topk=True),
    "topk-sigmoid": lambda xp: mr.TopK(E, 2, score="sigmoid"),
    "topk-sigmoid-raw": lambda xp: mr.TopK(E, 2, score="sigmoid", normalize=False),
    "topk-sigmoid-after-topk": lambda xp: mr.TopK(E, 2, score="sigmoid", softmax_after_topk=True),
    # DeepSeekTopK: sigmoid (V3) and softmax (V2) scores, renormalised or not, group-limited,
    # with a selection bias (which may pick experts whose scores are tiny).
    **{
        f"deepseek-{score}{'' if normalize else '-raw'}-{group}": (
            lambda xp, score=score, normalize=normalize, group=group: _biased(
                mr.DeepSeekTopK(
                    E,
                    2,
                    num_groups=4,
                    topk_groups=2,
                    score=score,
                    normalize=normalize,
                    routed_scaling_factor=2.5,
                    group_score=group,
                ),
                xp,
            )
        )
        for score in ("sigmoid", "softmax")
        for normalize in (True, False)
        for group in ("top2_sum", "max")
    },
    "null-experts": lambda xp: mr.NullExperts(6, 2, 2),
    "expert-choice": lambda xp: mr.ExpertChoice(E, 2.0),
    "gshard-all": lambda xp: mr.GShardTop2(E, second_expert_policy="all"),
    "gshard-random": lambda xp: (
        lambda v: mr.GShardTop2(E)(v, xp.asarray(np.linspace(0.0, 0.99, TOKENS).astype(np.float32)))
    ),
    "balanced-assignment": lambda xp: mr.BalancedAssignment(E),  # sigmoid combine weights
    "sinkhorn-token-choice": lambda xp: mr.SinkhornTokenChoice(E, 2),
    "sinkhorn-token-choice-normalized": lambda xp: mr.SinkhornTokenChoice(E, 2, normalize=True),
    "sinkhorn-expert-choice": lambda xp: mr.SinkhornExpertChoice(E),
    "sparsity-constrained": lambda xp: mr.SparsityConstrainedExpertChoice(E),
    "locality": lambda xp: lambda v: mr.LocalityTopK(E, 2, num_nodes=2)(v, xp.asarray(NODES)),
    "affinity": lambda xp: mr.AffinityRouting(E, 2.0),
    "anchor": lambda xp: (
        lambda v: mr.AnchorRouting(mr.TopK(E, 2, score="sigmoid"), 4)(v, xp.asarray(ANCHORS))
    ),
}
# HashRouter routes token ids (no logits, no score); FrozenRandomRouter and
# cosine_router_logits make logits, covered below.


def _biased(router, xp):
    return lambda v: router(v, xp.asarray(BIAS))


def _objective(route, values, xp, count="top_k"):
    """Weights and probabilities with distinct coefficients, plus the losses that read them."""
    routing = route(values)
    weights = routing.weights * xp.asarray(np.linspace(0.5, 1.5, routing.weights.shape[0]))
    probs = routing.probs * xp.asarray(
        np.linspace(-1.0, 1.0, math.prod(routing.probs.shape))
        .reshape(routing.probs.shape)
        .astype(np.float32)
    )
    losses = mr.losses.load_balancing(routing, count=count) + mr.losses.entropy(routing)
    if routing.layout == "token":
        losses = losses + mr.losses.sequence_load_balancing(routing, count=count)
    return xp.sum(weights) + xp.sum(probs) + losses + mr.losses.z_loss(values)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_values_are_finite_on_numpy(name):
    route = POLICIES[name](np)
    routing = route(ROWS)
    for field in ("weights", "probs"):
        assert np.isfinite(getattr(routing, field)).all(), field
    # The non-finite row routes nowhere; every other row reaches an expert.
    per_token = routing.expert_ids.reshape(-1) >= 0
    reached = np.zeros(TOKENS, bool)
    np.logical_or.at(reached, routing.token_ids, per_token)
    assert not reached[6]
    assert np.isfinite(float(_objective(route, ROWS, np)))


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("framework", sorted(GRADIENTS))
def test_policy_gradients_are_finite(name, framework):
    xp = _namespace(framework)
    route = POLICIES[name](xp)
    grad = GRADIENTS[framework](lambda v: _objective(route, v, xp), ROWS)
    assert np.isfinite(grad).all(), np.argwhere(~np.isfinite(grad))
    assert not grad[6].any()  # the non-finite row gets no gradient
    assert grad[ROWS == -INF].tolist() == [0.0] * int((ROWS == -INF).sum())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_gradients_agree_between_torch_and_jax(name):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    grads = []
    for framework in ("torch", "jax"):
        xp = Backend(framework).namespace()
        route = POLICIES[name](xp)
        # The routing's own choices: for a policy that does not pick the top-k of its scores
        # (biased DeepSeek, locality, Sinkhorn), the top-k of scores that underflow ranks
        # differently where XLA flushes denormals to zero (documented with count=).
        grads.append(
            GRADIENTS[framework](
                lambda v, xp=xp, route=route: _objective(route, v, xp, "choices"), ROWS
            )
        )
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("framework", sorted(GRADIENTS))
def test_soft_moe_gradients_are_finite(framework):
    xp = _namespace(framework)
    router = mr.SoftMoE(4, 2)  # 8 slots: a softmax over tokens (dispatch) and over slots
    coefficients = np.linspace(-1.0, 1.0, ROWS.size).reshape(ROWS.shape).astype(np.float32)

    def objective(values):
        soft = router(values)
        weights = xp.asarray(coefficients)
        return xp.sum(soft.dispatch_weights * weights) + xp.sum(soft.combine_weights * weights)

    grad = GRADIENTS[framework](objective, ROWS)
    assert np.isfinite(grad).all()


# --------------------------------------------------------------------------------------------
# Score functions outside the policies: noise scale, method gates, distillation losses.

EXTREME_ROW = np.asarray([[-INF, -1e4, -100.0, 0.0, 100.0, 1e4, INF]], np.float32)
FINITE_ROW = np.asarray([[-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4]], np.float32)

FUNCTIONS = {
    # softplus noise scale of noisy top-k gating (Shazeer 2017)
    "noisy_top_k_std": (lambda v, xp: xp.sum(mr.noisy_top_k_std(v)), EXTREME_ROW),
    # a task that sees one expert is weighted by the sigmoid of its logit (HoME)
    "multi_gate-sigmoid": (
        lambda v, xp: xp.sum(
            mr.multitask.multi_gate(xp.reshape(v, (7, 1, 1)), single_expert="sigmoid")
        ),
        EXTREME_ROW,
    ),
    # 2 * sigmoid feature gate (HoME)
    "feature_gate": (
        lambda v, xp: xp.sum(
            mr.multitask.feature_gate(
                xp.ones((1, 7)), xp.reshape(v, (7, 1)) * 0.0 + 1.0, xp.reshape(v, (1, 7))
            )
        ),
        FINITE_ROW,
    ),
    # swish after expert normalisation (HoME)
    "expert_normalization": (
        lambda v, xp: xp.sum(mr.multitask.expert_normalization(xp.reshape(v, (7, 1, 1)))),
        FINITE_ROW,
    ),
    # Bernoulli KL through log-sigmoids, and its normalised form (dual-head distillation)
    "binary_kl": (
        lambda v, xp: mr.distillation.binary_kl(v, xp.zeros_like(v) - 3.0),
        FINITE_ROW,
    ),
    "binary_kl_norm": (
        lambda v, xp: mr.distillation.binary_kl_norm(v, xp.zeros_like(v) - 3.0),
        FINITE_ROW,
    ),
    # sigmoid of an MLP over the weak model's dispersion (Mowst)
    "mlp_confidence": (
        lambda v, xp: xp.sum(
            mr.confidence.mlp_confidence(xp.asarray([[0.0, 1.0], [1.0, 0.0]]), [(v, xp.zeros(1))])
        ),
        np.asarray([[1e4], [-1e4]], np.float32),  # pre-activations of +-1e4 through a sigmoid
    ),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("framework", sorted(GRADIENTS))
def test_score_function_gradients_are_finite(name, framework):
    xp = _namespace(framework)
    function, values = FUNCTIONS[name]
    grad = GRADIENTS[framework](lambda v: function(v, xp), values)
    assert np.isfinite(grad).all(), grad
