"""HoME's multi-gate mixtures, helpers and anomaly diagnostics against float64 loop references."""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, to_numpy
from moerouter.testing.asserts import assert_equal
from moerouter.testing.reference.methods import (
    reference_expert_collapse,
    reference_expert_degradation,
    reference_expert_normalization,
    reference_expert_underfitting,
    reference_feature_gate,
    reference_hierarchy_mask,
    reference_mix,
    reference_multi_gate,
    reference_self_gate,
)

# Softmaxes over E <= 9 experts, sums of <= 16 * 9 products, a mean and variance over N = 16
# rows: each a few dozen float32 roundings, under 2**-18 relative; 2**-15 leaves the factor of two
# and headroom. atol covers outputs near zero (normalised features, differences of means).
TOL = {"rtol": 2.0**-15, "atol": 2.0**-18}
RNG = np.random.default_rng(7)
N, D = 16, 4
CATEGORIES = [0, 0, 1]  # three tasks in two meta-categories
# 1 global + 2 categories x 1 + 3 tasks x 2 = 9 experts
LAYOUT = {"num_shared": 1, "num_per_category": 1, "num_per_task": 2}
TASKS, EXPERTS = 3, 9
VISIBLE, SPECIFIC = reference_hierarchy_mask(CATEGORIES, 1, 1, 2)
GATE_LOGITS = (2.0 * RNG.standard_normal((N, TASKS, EXPERTS))).astype(np.float32)
GATE_LOGITS[0, 0, 5] = np.inf  # a hidden expert's logit must not leak into its task's gate
EXPERT_OUTPUTS = RNG.standard_normal((N, EXPERTS, D)).astype(np.float32)


def test_hierarchy_mask(backend):
    xp = backend.namespace()
    visible, specific = mr.multitask.hierarchy_mask(CATEGORIES, **LAYOUT, xp=xp)
    assert_equal(visible, VISIBLE, "visible")
    assert_equal(specific, SPECIFIC, "specific")
    # Invariants: a task's own experts are visible to it and to no other task; the global expert
    # is seen by all.
    v, s = to_numpy(visible), to_numpy(specific)
    assert np.all(v[s]) and np.all(s.sum(axis=0) <= 1) and np.all(v[:, 0])
    # An int array of categories gives the same masks, in its own namespace.
    from_array, _ = mr.multitask.hierarchy_mask(
        backend.asarray(np.asarray(CATEGORIES, np.int32)), **LAYOUT
    )
    assert_equal(from_array, VISIBLE, "visible from an array")


def test_hierarchy_mask_meta_level():
    # HoME's first level: categories in place of tasks, each seeing the global and its own experts.
    visible, specific = mr.multitask.hierarchy_mask(
        range(2), num_shared=2, num_per_category=0, num_per_task=3
    )
    expected = np.zeros((2, 8), bool)
    expected[:, :2] = True
    expected[0, 2:5] = expected[1, 5:8] = True
    assert_equal(visible, expected, "visible")
    assert_equal(specific, expected & (np.arange(8) >= 2), "specific")  # categories' own


@pytest.mark.parametrize(
    ("visible", "single_expert"),
    [
        # Every expert visible: plain MMoE softmax gates.
        pytest.param(None, "softmax", id="mmoe"),
        # HoME's hierarchy mask, with an inf logit on a hidden expert.
        pytest.param(VISIBLE, "softmax", id="hierarchy"),
        # Task 2 sees a single expert: sigmoid weight instead of 1.
        pytest.param(
            np.eye(TASKS, EXPERTS, dtype=bool) | VISIBLE * np.asarray([[1], [1], [0]], bool),
            "sigmoid",
            id="single-expert",
        ),
    ],
)
def test_multi_gate_and_mix(backend, visible, single_expert):
    logits = GATE_LOGITS if visible is not None else np.nan_to_num(GATE_LOGITS, posinf=3.0)
    gates = mr.multitask.multi_gate(
        backend.asarray(logits),
        None if visible is None else backend.asarray(visible),
        single_expert=single_expert,
    )
    expected = reference_multi_gate(logits, visible, single_expert)
    assert_close(gates, expected, "gates", **TOL)
    values = to_numpy(gates)
    if visible is not None:
        assert np.all(values[:, ~visible] == 0.0)  # hidden experts: weight exactly 0
    if single_expert == "softmax":
        np.testing.assert_allclose(values.sum(axis=2), 1.0, rtol=1e-6)
    mixed = mr.multitask.mix(gates, backend.asarray(EXPERT_OUTPUTS))
    assert mixed.shape == (N, TASKS, D)
    assert_close(mixed, reference_mix(expected, EXPERT_OUTPUTS), "mix", **TOL)


@pytest.mark.parametrize(
    "per_expert",
    [
        # One (B, A) pair shared by the caller's one expert: (N, d) out.
        pytest.param(False, id="one-expert"),
        # A stack of E = 3 pairs: (N, E, d) out, every expert its own gate.
        pytest.param(True, id="per-expert"),
    ],
)
def test_feature_gate(backend, per_expert):
    features = RNG.standard_normal((N, D)).astype(np.float32)
    batch = (3,) if per_expert else ()
    down = RNG.standard_normal((*batch, D, 2)).astype(np.float32)
    up = RNG.standard_normal((*batch, 2, D)).astype(np.float32)
    gated = mr.multitask.feature_gate(
        backend.asarray(features), backend.asarray(down), backend.asarray(up)
    )
    assert_close(gated, reference_feature_gate(features, down, up), "feature_gate", **TOL)
    # Invariant: the gate lies in (0, 2), so every output keeps its feature's sign.
    out = to_numpy(gated)
    ref = features[:, None, :] if per_expert else features
    assert np.all(out * ref >= 0) and np.all(np.abs(out) <= 2 * np.abs(ref) + 1e-6)


@pytest.mark.parametrize(
    ("num_experts", "with_residual"),
    [
        # Softmax over 3 lower experts, added to the upper output.
        pytest.param(3, True, id="softmax-residual"),
        # One lower expert: sigmoid weight, no residual.
        pytest.param(1, False, id="sigmoid"),
    ],
)
def test_self_gate(backend, num_experts, with_residual):
    outputs = RNG.standard_normal((N, num_experts, D)).astype(np.float32)
    logits = RNG.standard_normal((N, num_experts)).astype(np.float32)
    residual = RNG.standard_normal((N, D)).astype(np.float32) if with_residual else None
    gated = mr.multitask.self_gate(
        backend.asarray(outputs),
        backend.asarray(logits),
        residual=None if residual is None else backend.asarray(residual),
    )
    assert_close(gated, reference_self_gate(outputs, logits, residual), "self_gate", **TOL)


@pytest.mark.parametrize(
    "options",
    [
        # Training mode: batch statistics, Swish (HoME's fix for collapse).
        pytest.param({}, id="batch-swish"),
        # Inference mode: running statistics, affine, ReLU (the MMoE baseline).
        pytest.param({"running": True, "affine": True, "activation": "relu"}, id="running-relu"),
        # One expert's (N, d) outputs, no activation.
        pytest.param({"single": True, "activation": "identity"}, id="single-identity"),
    ],
)
def test_expert_normalization(backend, options):
    outputs = (3.0 * RNG.standard_normal((N, 3, D)) + 1.0).astype(np.float32)
    if options.get("single"):
        outputs = outputs[:, 0]
    kwargs = {"activation": options.get("activation", "swish")}
    if options.get("running"):
        kwargs["mean"] = RNG.standard_normal(outputs.shape[1:]).astype(np.float32)
        kwargs["variance"] = RNG.uniform(0.5, 2.0, outputs.shape[1:]).astype(np.float32)
    if options.get("affine"):
        kwargs["scale"] = RNG.uniform(0.5, 2.0, outputs.shape[1:]).astype(np.float32)
        kwargs["shift"] = RNG.standard_normal(outputs.shape[-1]).astype(np.float32)  # broadcast
    normalised = mr.multitask.expert_normalization(
        backend.asarray(outputs),
        **{k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()},
    )
    expected = reference_expert_normalization(outputs, **kwargs)
    assert_close(normalised, expected, "expert_normalization", **TOL)
    if not options:
        # Invariant: before Swish every (expert, feature) column has mean 0 and variance ~1.
        plain = to_numpy(mr.multitask.expert_normalization(outputs, activation="identity"))
        np.testing.assert_allclose(plain.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(plain.var(axis=0), 1.0, rtol=1e-3)


def test_expert_collapse(backend):
    activations = np.maximum(RNG.standard_normal((N, 4, D)), 0).astype(np.float32)
    activations[:, 1] = np.maximum(activations[:, 1] - 1.5, 0)  # a mostly dead ReLU expert
    activations[:, 2] *= 10.0  # an expert on another scale
    stats = mr.multitask.expert_collapse(backend.asarray(activations))
    expected = reference_expert_collapse(activations)
    assert set(stats) == set(expected)
    for name, value in stats.items():
        assert_close(value, expected[name], name, **TOL)
    assert to_numpy(stats["zero_share"])[1] > 0.8  # the abstract's ">90 % zeros" signature
    # A constant expert next to a varying one: infinite spread; all constant: 1.
    constant = np.zeros((N, 2, D), np.float32)
    assert float(mr.multitask.expert_collapse(backend.asarray(constant))["scale_spread"]) == 1.0
    constant[:, 0] = activations[:, 0]
    assert np.isinf(float(mr.multitask.expert_collapse(backend.asarray(constant))["scale_spread"]))


def test_degradation_and_underfitting(backend):
    gates = reference_multi_gate(GATE_LOGITS, VISIBLE).astype(np.float32)
    gates[:, 1:, 0] *= 0.01  # the global expert is (almost) task 0's alone: degradation
    stats = mr.multitask.expert_degradation(backend.asarray(gates))
    expected = reference_expert_degradation(gates)
    for name in ("mass", "share", "dominance"):
        assert_close(stats[name], expected[name], name, **TOL)
    assert_equal(stats["dominant_task"], expected["dominant_task"], "dominant_task")
    assert int(to_numpy(stats["dominant_task"])[0]) == 0 and to_numpy(stats["dominance"])[0] > 0.9
    np.testing.assert_allclose(to_numpy(stats["share"]).sum(axis=0), 1.0, rtol=1e-6)

    under = mr.multitask.expert_underfitting(backend.asarray(gates), backend.asarray(SPECIFIC))
    expected = reference_expert_underfitting(gates, SPECIFIC)
    for name in ("specific_mass", "shared_mass"):
        assert_close(under[name], expected[name], name, **TOL)


def test_blind_task_gets_nan_gates():
    # A task seeing no expert is not checked (no host sync): its gates are NaN, others intact.
    visible = np.asarray([[True, False], [False, False]])
    gates = mr.multitask.multi_gate(np.zeros((1, 2, 2), np.float32), visible)
    assert np.all(np.isnan(gates[0, 1])) and gates[0, 0].tolist() == [1.0, 0.0]


def test_unused_expert_has_no_dominant_task():
    gates = np.zeros((2, 2, 3), np.float32)
    gates[:, :, 0] = 1.0
    stats = mr.multitask.expert_degradation(gates)
    assert to_numpy(stats["dominant_task"]).tolist() == [0, -1, -1]


def test_gradients_skip_hidden_experts():
    # Hidden logits get exactly zero gradient (even an inf one), visible ones a finite gradient.
    torch = pytest.importorskip("torch")
    logits = torch.asarray(GATE_LOGITS).requires_grad_()
    gates = mr.multitask.multi_gate(logits, torch.asarray(VISIBLE))
    mixed = mr.multitask.mix(gates, torch.asarray(EXPERT_OUTPUTS))
    mixed.square().sum().backward()
    grad = to_numpy(logits.grad)
    assert np.all(grad[:, ~VISIBLE] == 0.0) and np.all(np.isfinite(grad))
    assert np.any(grad[:, VISIBLE] != 0.0)


def test_jax_jit():
    # Every piece runs under jit (static shapes, no host sync).
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    @jax.jit
    def forward(logits, outputs):
        gates = mr.multitask.multi_gate(logits, jnp.asarray(VISIBLE))
        normalised = mr.multitask.expert_normalization(outputs)
        return mr.multitask.mix(gates, normalised), mr.multitask.expert_degradation(gates)

    mixed, stats = forward(
        jnp.asarray(np.nan_to_num(GATE_LOGITS, posinf=1.0)), jnp.asarray(EXPERT_OUTPUTS)
    )
    assert mixed.shape == (N, TASKS, D) and stats["dominance"].shape == (EXPERTS,)


BAD = [
    # Gate logits must be (N, tasks, E).
    (lambda: mr.multitask.multi_gate(np.ones((2, 3), np.float32)), ValueError, "gate_logits"),
    # A mask of the wrong shape.
    (
        lambda: mr.multitask.multi_gate(np.ones((2, 3, 4), np.float32), np.ones((3, 5), bool)),
        ValueError,
        "visible",
    ),
    # An integer mask.
    (
        lambda: mr.multitask.multi_gate(np.ones((2, 3, 4), np.float32), np.ones((3, 4), np.int32)),
        TypeError,
        "visible",
    ),
    # Unknown single-expert rule.
    (
        lambda: mr.multitask.multi_gate(np.ones((2, 1, 2), np.float32), single_expert="max"),
        ValueError,
        "single_expert",
    ),
    # Expert outputs for another number of experts than the gates.
    (
        lambda: mr.multitask.mix(np.ones((2, 3, 4), np.float32), np.ones((2, 5, 6), np.float32)),
        ValueError,
        "expert_outputs",
    ),
    # Negative expert counts.
    (
        lambda: mr.multitask.hierarchy_mask([0], num_shared=-1, num_per_category=1, num_per_task=1),
        ValueError,
        "num_shared",
    ),
    # A category out of range.
    (
        lambda: mr.multitask.hierarchy_mask(
            [0, 2], num_shared=1, num_per_category=1, num_per_task=1, num_categories=2
        ),
        ValueError,
        "task_category",
    ),
    # Non-integer categories.
    (
        lambda: mr.multitask.hierarchy_mask(
            [0.5], num_shared=1, num_per_category=1, num_per_task=1
        ),
        TypeError,
        "task_category",
    ),
    # No expert at all.
    (
        lambda: mr.multitask.hierarchy_mask([0], num_shared=0, num_per_category=0, num_per_task=0),
        ValueError,
        "num_shared",
    ),
    # A task with nothing to see (no shared, no own experts, its category has none).
    (
        lambda: mr.multitask.hierarchy_mask(
            [0, 1], num_shared=0, num_per_category=0, num_per_task=0
        ),
        ValueError,
        "num_shared",
    ),
    # LoRA factors that do not chain.
    (
        lambda: mr.multitask.feature_gate(
            np.ones((2, 4), np.float32), np.ones((4, 2), np.float32), np.ones((3, 4), np.float32)
        ),
        ValueError,
        "up",
    ),
    # Self-gate logits for another number of experts.
    (
        lambda: mr.multitask.self_gate(np.ones((2, 3, 4), np.float32), np.ones((2, 2), np.float32)),
        ValueError,
        "gate_logits",
    ),
    # Mean without variance.
    (
        lambda: mr.multitask.expert_normalization(
            np.ones((2, 3), np.float32), mean=np.zeros(3, np.float32)
        ),
        ValueError,
        "variance",
    ),
    # Unknown activation.
    (
        lambda: mr.multitask.expert_normalization(np.ones((2, 3), np.float32), activation="gelu"),
        ValueError,
        "activation",
    ),
    # A negative tolerance.
    (
        lambda: mr.multitask.expert_collapse(np.ones((2, 3, 4), np.float32), atol=-1.0),
        ValueError,
        "atol",
    ),
    # A specific mask of the wrong shape.
    (
        lambda: mr.multitask.expert_underfitting(
            np.ones((2, 3, 4), np.float32), np.ones((3, 5), bool)
        ),
        ValueError,
        "specific",
    ),
]


@pytest.mark.parametrize(("call", "error", "name"), BAD)
def test_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()
