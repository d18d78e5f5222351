"""grouped_matmul and expert_mlp equal a per-expert loop, on the valid rows only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from moerouter_jax import expert_mlp, grouped_matmul
from moerouter_jax.layer import _activate
from x64 import enable_x64

IMPLEMENTATIONS = ["tiled", "ragged_dot"]


def randn(*shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def loop_reference(x, weight, group_sizes):
    """float64, one expert at a time; rows past the groups stay zero."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    out = np.zeros((x.shape[0], weight.shape[2]))
    start = 0
    for expert, size in enumerate(np.asarray(group_sizes).tolist()):
        out[start : start + size] = x[start : start + size] @ weight[expert]
        start += size
    return out


GROUPS = [
    # An empty expert and spare rows past the groups (drops / null experts).
    pytest.param([3, 0, 5, 2], 14, id="empty-and-spare"),
    # Groups longer than a tile and crossing tile boundaries (tile_rows=4 below).
    pytest.param([9, 1, 6, 0], 16, id="multi-tile"),
    # Every row valid, one expert only.
    pytest.param([12, 0, 0, 0], 12, id="one-expert"),
    # No valid row at all: the output is all zero.
    pytest.param([0, 0, 0, 0], 6, id="nothing-valid"),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("sizes", "rows"), GROUPS)
def test_grouped_matmul_equals_per_expert_loop(implementation, sizes, rows):
    group_sizes = jnp.asarray(sizes, jnp.int32)
    x, weight = randn(rows, 5, seed=0), randn(4, 5, 3, seed=1)
    out = grouped_matmul(
        jnp.asarray(x),
        jnp.asarray(weight),
        group_sizes,
        implementation=implementation,
        tile_rows=4,
    )
    np.testing.assert_allclose(out, loop_reference(x, weight, sizes), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[sum(sizes) :] == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grouped_matmul_gradients_float64(implementation):
    group_sizes = jnp.asarray([2, 0, 5], jnp.int32)
    with enable_x64():
        x = jnp.asarray(randn(9, 3, seed=2, dtype=np.float64))
        weight = jnp.asarray(randn(3, 3, 4, seed=3, dtype=np.float64))

        def product(x, weight):
            return grouped_matmul(
                x, weight, group_sizes, implementation=implementation, tile_rows=2
            )

        check_grads(product, (x, weight), order=1, modes=["rev"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_over_groups_with_their_own_sizes_under_jit_and_grad(implementation):
    # Per-group sizes: jax 0.10.2's ragged_dot cannot batch them itself ("NYI"), so its vmap is
    # a map over the groups; both must equal one call per group, gradients included.
    group_sizes = jnp.asarray([[3, 4, 0], [0, 1, 9]], jnp.int32)
    x = jnp.asarray(randn(2, 10, 4, seed=4))
    weight = jnp.asarray(randn(3, 4, 4, seed=5))

    def one(x, weight, sizes):
        out = grouped_matmul(x, weight, sizes, implementation=implementation, tile_rows=4)
        return jnp.sum(jnp.tanh(out))

    def batched(x, weight):
        return jnp.sum(jax.vmap(one, (0, None, 0))(x, weight, group_sizes))

    grad_x, grad_weight = jax.jit(jax.grad(batched, argnums=(0, 1)))(x, weight)
    want_weight = np.zeros(weight.shape)
    for g in range(2):
        want_x, want_w = jax.grad(one, argnums=(0, 1))(x[g], weight, group_sizes[g])
        np.testing.assert_allclose(grad_x[g], want_x, rtol=1e-5, atol=1e-6)
        want_weight += np.asarray(want_w)
    np.testing.assert_allclose(grad_weight, want_weight, rtol=1e-5, atol=1e-5)
    per_group = jax.jit(jax.vmap(jax.grad(one), (0, None, 0)))(x, weight, group_sizes)
    np.testing.assert_allclose(per_group, grad_x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu", "silu"])
def test_expert_mlp_equals_dense_per_row(activation):
    group_sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)
    width_in = 12 if activation == "swiglu" else 6
    w_in, w_out = jnp.asarray(randn(4, 4, width_in, seed=6)), jnp.asarray(randn(4, 6, 4, seed=7))
    xe = jnp.asarray(randn(13, 4, seed=8))
    out = np.asarray(expert_mlp(w_in, w_out, xe, group_sizes, activation=activation))
    experts = np.repeat(np.arange(4), np.asarray(group_sizes))
    for row in range(13):
        if row >= len(experts):
            assert np.all(out[row] == 0)
            continue
        e = experts[row]
        want = _activate(xe[row] @ w_in[e], activation) @ w_out[e]
        np.testing.assert_allclose(out[row], want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_parameter():
    x, weight, sizes = jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.asarray([1, 1], jnp.int32)
    with pytest.raises(ValueError, match="implementation"):
        grouped_matmul(x, weight, sizes, implementation="dense")
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, weight, jnp.asarray([1, 1, 1], jnp.int32))
    with pytest.raises(ValueError, match="weight"):
        grouped_matmul(x, jnp.ones((2, 3, 3)), sizes)
    with pytest.raises(ValueError, match="tile_rows"):
        grouped_matmul(x, weight, sizes, tile_rows=0)
    with pytest.raises(ValueError, match="activation"):
        expert_mlp(weight, weight, x, sizes, activation="tanh")
