"""The fast selection kernels (``top_k`` and ``router`` slots) equal the stable-sort reference.

Every case draws logits from a handful of values, so ties are everywhere: among the chosen, at
the boundary of the chosen set, among ``-inf`` masks, and whole rows of NaN, +inf or -inf. The
reference is the agnostic ``argsort(-scores, stable=True)`` (the implementation before the fast
kernels) and, for the policies, the same policy under ``MOEROUTER_BACKEND=reference``.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moerouter as mr
from moerouter import _registry
from moerouter._agnostic.select import select_top_k
from moerouter.testing.backends import Backend, to_numpy

# Few distinct values: most rows hold ties. -0.0 must tie with 0.0 (JAX's top_k would not).
TIE_VALUES = [-np.inf, -2.0, -1.0, -0.0, 0.0, 1.0, 2.0]
BAD_VALUES = [np.nan, np.inf]
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Backends with a top_k kernel; array_api_strict runs the reference (checked against NumPy's).
FAST = {Backend.NUMPY, Backend.TORCH, Backend.JAX}


@contextlib.contextmanager
def reference_backend():
    previous = os.environ.get("MOEROUTER_BACKEND")
    os.environ["MOEROUTER_BACKEND"] = "reference"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MOEROUTER_BACKEND"]
        else:
            os.environ["MOEROUTER_BACKEND"] = previous


@st.composite
def tied_logits(draw, *, bad_rows: bool, max_columns: int = 12):
    """(G, S, E) float32 logits full of ties, with an optional NaN/+inf entry or bad row."""
    groups = draw(st.integers(1, 2))
    tokens = draw(st.integers(0, 9))
    columns = draw(st.integers(1, max_columns))
    values = TIE_VALUES + (BAD_VALUES if bad_rows else [])
    flat = draw(
        st.lists(
            st.sampled_from(values),
            min_size=groups * tokens * columns,
            max_size=groups * tokens * columns,
        )
    )
    logits = np.asarray(flat, dtype=np.float32).reshape(groups, tokens, columns)
    if bad_rows and tokens:
        row = draw(st.integers(0, tokens - 1))
        logits[0, row] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return logits


def reference_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


@SETTINGS
@given(data=st.data())
def test_top_k_slot_equals_stable_sort(backend, xp, data):
    # Ties, -inf, NaN and +inf anywhere; k from 1 to E (k = E takes every column).
    logits = data.draw(tied_logits(bad_rows=True))
    k = data.draw(st.integers(1, logits.shape[-1]))
    array = backend.asarray(logits)
    if backend in FAST:
        assert _registry.kernel_for("top_k", array) is not None  # the fast path is what runs
    got = to_numpy(select_top_k(array, k, xp=xp))
    np.testing.assert_array_equal(got, reference_top_k(logits, k))


@pytest.mark.parametrize(
    "k",
    [
        pytest.param(1, id="k=1"),  # the argmax: the boundary is the second best
        pytest.param(3, id="k=3"),
        pytest.param(8, id="k=E"),  # no boundary: the whole row, sorted
    ],
)
def test_top_k_slot_on_all_equal_and_masked_rows(backend, xp, k):
    # Rows where every check falls back: all equal, all -inf, all NaN, one finite among -inf.
    logits = np.array(
        [
            [1.0] * 8,
            [-np.inf] * 8,
            [np.nan] * 8,
            [-np.inf] * 5 + [3.0] + [-np.inf] * 2,
            [0.0, -0.0, 0.0, -0.0, 1.0, 1.0, -1.0, -1.0],
            [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # no tie at all: no fallback
        ],
        dtype=np.float32,
    )
    got = to_numpy(select_top_k(backend.asarray(logits), k, xp=xp))
    np.testing.assert_array_equal(got, reference_top_k(logits, k))


@SETTINGS
@given(data=st.data())
def test_top_k_slot_with_nan_free_promise(backend, xp, data):
    # Cleaned logits promise no NaN (nan_free=True): JAX then skips its second top_k.
    logits = data.draw(tied_logits(bad_rows=False))
    k = data.draw(st.integers(1, logits.shape[-1]))
    got = to_numpy(select_top_k(backend.asarray(logits), k, xp=xp, nan_free=True))
    np.testing.assert_array_equal(got, reference_top_k(logits, k))


def test_jax_top_k_breaks_ties_by_lower_index():
    # The JAX kernel relies on this (no fallback): XLA's TopK ranks equal values by index,
    # -inf included. It ranks 0.0 above -0.0 and NaN first: the kernel maps -0.0 to 0.0 and
    # sends a batch holding NaN to the stable sort.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    values = jnp.asarray([[1.0, 3.0, 3.0, 0.0, 3.0], [-jnp.inf, -jnp.inf, 0.0, -jnp.inf, 1.0]])
    _, columns = jax.jit(lambda v: jax.lax.top_k(v, 5))(values)
    np.testing.assert_array_equal(np.asarray(columns), [[1, 2, 4, 0, 3], [4, 2, 0, 1, 3]])


def test_jax_top_k_kernel_under_jit():
    # Traced scores: no data-dependent fallback is possible, and none is needed.
    jax = pytest.importorskip("jax")
    from moerouter_jax import _kernels

    logits = np.array([[np.nan, 1.0, -0.0, 0.0, -np.inf, 1.0]], dtype=np.float32)
    got = jax.jit(_kernels.top_k, static_argnums=1)(jax.numpy.asarray(logits), 6)
    np.testing.assert_array_equal(np.asarray(got), reference_top_k(logits, 6))


def _policies(num_columns: int, k: int, rng: np.random.Generator):
    """(policy, extra arguments as NumPy, what it covers) for every router-slot user."""
    cases = [
        (mr.TopK(num_columns, k), (), "softmax, renormalised"),
        (mr.TopK(num_columns, k, score="sigmoid"), (), "sigmoid, log-space renormalisation"),
        (mr.TopK(num_columns, k, normalize=False), (), "raw probabilities"),
        (mr.TopK(num_columns, k, softmax_after_topk=True), (), "softmax after top-k"),
        (mr.DeepSeekTopK(num_columns, k), (), "selection on sigmoid scores"),
        (
            mr.DeepSeekTopK(num_columns, k),
            (rng.choice([-0.5, 0.0, 0.5], num_columns).astype(np.float32),),
            "selection on scores + bias (bias ties too)",
        ),
        (mr.TopK(num_columns, k, capacity_factor=1.0), (), "capacity after the router"),
    ]
    if num_columns >= 2:
        cases.append((mr.NullExperts(num_columns // 2, num_columns - num_columns // 2, k), (), ""))
        cases.append((mr.GShardTop2(num_columns, second_expert_policy="all"), (), "gate ratio"))
    if num_columns % 2 == 0 and k <= num_columns // 2:
        grouped = mr.DeepSeekTopK(num_columns, k, num_groups=2, topk_groups=1)
        cases.append((grouped, (), "group-limited selection"))
    return cases


@SETTINGS
@given(data=st.data())
def test_router_slot_equals_reference(backend, xp, data):
    # Every token-choice policy on the router slot equals the reference path: identical integer
    # fields, weights and probabilities within float32 rounding (bitwise on NumPy).
    logits = data.draw(tied_logits(bad_rows=data.draw(st.booleans())))
    k = data.draw(st.integers(1, logits.shape[-1]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    for policy, extra, _ in _policies(logits.shape[-1], k, rng):
        arguments = [backend.asarray(value) for value in (logits, *extra)]
        got = policy(*arguments)
        with reference_backend():
            expected = policy(*arguments)
        for name in ("token_ids", "expert_ids", "choice_ids", "finite_rows"):
            np.testing.assert_array_equal(
                to_numpy(getattr(got, name)), to_numpy(getattr(expected, name)), err_msg=name
            )
        exact = backend is Backend.NUMPY
        for name in ("weights", "probs"):
            actual, desired = to_numpy(getattr(got, name)), to_numpy(getattr(expected, name))
            if exact:
                np.testing.assert_array_equal(actual, desired, err_msg=name)
            else:
                np.testing.assert_allclose(actual, desired, rtol=2e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "other_row",
    [
        pytest.param([0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0], id="tie"),  # takes the stable sort
        pytest.param([1.0, -np.inf, -np.inf] + [-np.inf] * 5, id="masked-choice"),  # not routed
        pytest.param([np.nan] * 8, id="nan-row"),  # the batch goes to the reference
    ],
)
def test_router_slot_is_batch_invariant(backend, xp, other_row):
    # Token 0's weights and probabilities must not change when another token has a tie, a
    # masked choice or a NaN row (a batch-wide shortcut or layout would change its rounding).
    rng = np.random.default_rng(3)
    plain = rng.standard_normal((24, 8)).astype(np.float32)
    changed = plain.copy()
    changed[5] = other_row
    for policy in (mr.TopK(8, 2), mr.TopK(8, 3, score="sigmoid"), mr.NullExperts(4, 4, 3)):
        first, second = (policy(backend.asarray(logits)) for logits in (plain, changed))
        for name in ("weights", "probs"):
            np.testing.assert_array_equal(
                to_numpy(getattr(first, name))[: 3 if name == "weights" else 1],
                to_numpy(getattr(second, name))[: 3 if name == "weights" else 1],
                err_msg=name,
            )


def test_torch_router_gradient_equals_reference():
    # The fused CPU router keeps the gradient: weights and probs back to the logits.
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 16, generator=generator)
    for policy in (mr.TopK(16, 4), mr.TopK(16, 4, score="sigmoid"), mr.NullExperts(8, 8, 4)):
        grads = []
        for reference in (False, True):
            logits = base.clone().requires_grad_(True)
            with reference_backend() if reference else contextlib.nullcontext():
                routing = policy(logits)
            (routing.weights.square().sum() + routing.probs.square().sum()).backward()
            grads.append(logits.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=["float16", "float64"])
def test_numpy_top_k_other_dtypes_equal_stable_sort(dtype):
    # float16 takes the unique-key partition like float32; float64 (no spare mantissa bits)
    # keeps argpartition with the tie check.
    from moerouter._numpy_backend import top_k

    rng = np.random.default_rng(5)
    logits = rng.choice(np.asarray(TIE_VALUES + BAD_VALUES), (40, 13)).astype(dtype)
    for k in (1, 4, 12):
        np.testing.assert_array_equal(top_k(logits, k), reference_top_k(logits, k))


def test_torch_router_weights_do_not_depend_on_requires_grad():
    # Without a gradient the CPU router reads the chosen logits back from its keys instead of
    # gathering them: the weights must be the same bits, -0.0 logits included.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = rng.choice(np.asarray([-1.5, -0.0, 0.0, 0.25, 2.0]), (32, 8)).astype(np.float32)
    for policy in (mr.TopK(8, 3), mr.TopK(8, 3, score="sigmoid"), mr.NullExperts(4, 4, 3)):
        plain = policy(torch.from_numpy(logits))
        tracked = policy(torch.from_numpy(logits).requires_grad_(True))
        for name in ("weights", "probs", "expert_ids"):
            np.testing.assert_array_equal(
                getattr(plain, name).numpy(), getattr(tracked, name).detach().numpy(), name
            )


def test_numpy_router_sigmoid_is_the_agnostic_sigmoid():
    # The NumPy router's where-free sigmoid must give the agnostic sigmoid's bits.
    import array_api_compat.numpy as np_xp

    from moerouter._agnostic.scores import sigmoid
    from moerouter._numpy_backend import _sigmoid

    rng = np.random.default_rng(6)
    edges = [0.0, -0.0, -np.inf, np.inf, 1e-45, -1e-45, 16.0, -16.0, 88.7, -88.7, -104.0, 1e30]
    values = np.concatenate([rng.standard_normal(4000) * 30, edges]).astype(np.float32)
    np.testing.assert_array_equal(
        _sigmoid(values).view(np.int32), sigmoid(values, xp=np_xp).view(np.int32)
    )


@SETTINGS
@given(data=st.data())
def test_group_top_two_equals_sorted(data):
    # DeepSeekTopK's group scores come from a max/min tree, not a sort: the same two largest
    # (NaN and -inf included; equal zeros may differ in sign only, which == ignores).
    import array_api_compat.numpy as np_xp

    from moerouter.policies.deepseek import _top_two

    size = data.draw(st.integers(1, 11))
    flat = data.draw(
        st.lists(st.sampled_from([*TIE_VALUES, np.nan]), min_size=3 * size, max_size=3 * size)
    )
    grouped = np.asarray(flat, dtype=np.float32).reshape(1, 3, size)
    first, second = _top_two(grouped, xp=np_xp)
    ascending = np.sort(grouped, axis=-1)
    np.testing.assert_array_equal(first, ascending[..., -1])
    if size > 1:  # the top2_sum score: the same sums (NaN wherever the group holds one)
        np.testing.assert_array_equal(first + second, ascending[..., -1] + ascending[..., -2])
        finite = ~np.isnan(first)
        np.testing.assert_array_equal(second[finite], ascending[..., -2][finite])
    else:
        np.testing.assert_array_equal(second, np.full_like(first, -np.inf))


def test_torch_router_weights_are_the_reference_bits():
    # The torch CPU router computes the weights with the reference's formula: bit-equal, not
    # merely close (a fused softmax over the k chosen differed by one ulp and failed CI).
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((64, 16)).astype(np.float32)
    logits[:8] = rng.choice(np.asarray(TIE_VALUES[1:]), (8, 16))
    bias = torch.from_numpy(rng.choice([-0.5, 0.0, 0.5], 16).astype(np.float32))
    calls = [
        (mr.TopK(16, 4), ()),
        (mr.TopK(16, 4, score="sigmoid"), ()),
        (mr.TopK(16, 4, softmax_after_topk=True), ()),
        (mr.NullExperts(8, 8, 4), ()),
        (mr.DeepSeekTopK(16, 4), (bias,)),
        (mr.DeepSeekTopK(16, 4, num_groups=4, topk_groups=2), (bias,)),
    ]
    for policy, extra in calls:
        got = policy(torch.from_numpy(logits), *extra)
        with reference_backend():
            expected = policy(torch.from_numpy(logits), *extra)
        np.testing.assert_array_equal(got.expert_ids.numpy(), expected.expert_ids.numpy())
        np.testing.assert_array_equal(
            got.weights.numpy().view(np.int32), expected.weights.numpy().view(np.int32)
        )


def test_router_kernels_without_eligible_are_not_asked_for_group_limits():
    # A plugin router kernel written before the eligible keyword keeps serving plain calls and
    # is skipped (reference path) for DeepSeekTopK's group-limited ones.
    from moerouter import _numpy_backend
    from moerouter.policies._router import _takes_eligible

    def old_kernel(values, k, *, score, weights, num_real, bias=None):
        return None

    def open_kernel(values, k, **options):
        return None

    assert _takes_eligible(_numpy_backend.router)
    assert _takes_eligible(open_kernel)
    assert not _takes_eligible(old_kernel)
