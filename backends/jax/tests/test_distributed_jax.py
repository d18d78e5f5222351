"""Expert parallelism over 4 host devices equals the single-device layer, gradients included.

XLA fixes the number of host devices when JAX starts, so the checks run in a fresh interpreter
(this file run as a script) with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import os
import subprocess
import sys

import pytest

WORLD, TOKENS, D, H, E = 4, 6, 8, 12, 8  # tokens per shard; two experts per shard


def test_expert_parallel_over_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout


@pytest.mark.parametrize(
    ("num_experts", "world_size"),
    [
        (6, 4),  # not a multiple
        (2, 4),  # fewer experts than shards
    ],
)
def test_uneven_experts_per_rank_rejected(num_experts, world_size):
    from moerouter_jax.distributed import experts_per_rank

    with pytest.raises(ValueError, match=f"num_experts={num_experts}.*world size {world_size}"):
        experts_per_rank(num_experts, world_size)


def experts(rows, group_sizes, w_in, w_out):
    """Dense per-row expert MLPs (gelu) on moerouter-grouped rows; zero past the groups."""
    import jax
    import jax.numpy as jnp

    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")
    valid = expert < group_sizes.shape[0]
    expert = jnp.minimum(expert, group_sizes.shape[0] - 1)
    hidden = jax.nn.gelu(jnp.einsum("nd,ndh->nh", rows, w_in[expert]))
    out = jnp.einsum("nh,nhd->nd", hidden, w_out[expert])
    return jnp.where(valid[:, None], out, 0.0)


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from moerouter_jax import distributed

    import moerouter as mr

    assert jax.device_count() == WORLD, jax.devices()
    mesh = jax.make_mesh((WORLD,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (WORLD * TOKENS, D))
    upstream = jax.random.normal(keys[1], (WORLD * TOKENS, D))
    w_in = jax.random.normal(keys[3], (E, D, H)) / D**0.5
    w_out = jax.random.normal(keys[4], (E, H, D)) / H**0.5

    def single(router, x, gate, w_in, w_out):
        plan = mr.make_plan(router(x @ gate))
        y = mr.combine(experts(mr.dispatch(x, plan), plan.group_sizes, w_in, w_out), plan)
        return jnp.sum(y * upstream), y

    def sharded(router, capacity, x, gate, w_in, w_out, logits=None):
        fixed = logits is not None  # route on given logits instead of the gate's
        if not fixed:
            logits = jnp.zeros((x.shape[0], 1))

        def layer(x, gate, w_in, w_out, logits):
            plan = mr.make_plan(router(logits if fixed else x @ gate))
            exchange = distributed.dispatch(x, plan, axis_name="ep", capacity=capacity)
            ye = experts(exchange.rows, exchange.group_sizes, w_in, w_out)
            y = distributed.combine(ye, exchange, axis_name="ep")
            real = jnp.sum(plan.group_sizes)
            counts = jnp.stack([exchange.rows_real, exchange.rows_dropped, real])
            return y, exchange.group_sizes, counts[None]

        return jax.shard_map(
            layer,
            mesh=mesh,
            in_specs=(P("ep"), P(), P("ep"), P("ep"), P("ep")),
            out_specs=(P("ep"), P("ep"), P("ep")),
        )(x, gate, w_in, w_out, logits)

    def sharded_loss(router, capacity, x, gate, w_in, w_out):
        y, _, _ = sharded(router, capacity, x, gate, w_in, w_out)
        return jnp.sum(y * upstream), y

    def close(got, want, what):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=what)

    cases = [
        ("top-k", mr.TopK(num_experts=E, k=2), E),
        ("null experts", mr.NullExperts(num_experts=E, num_null=E, k=2), 2 * E),
    ]
    for name, router, columns in cases:
        gate = jax.random.normal(keys[2], (D, columns))
        grad = jax.grad(single, argnums=(1, 2, 3, 4), has_aux=True)
        (want_grads, want_y) = grad(router, x, gate, w_in, w_out)
        ep_grad = jax.jit(
            jax.grad(sharded_loss, argnums=(2, 3, 4, 5), has_aux=True), static_argnums=(0, 1)
        )
        # Capacity T * k per expert per shard: nothing can be dropped.
        got_grads, got_y = ep_grad(router, TOKENS * 2, x, gate, w_in, w_out)
        close(got_y, want_y, f"{name}: y")
        for got, want, what in zip(got_grads, want_grads, ["x", "gate", "w_in", "w_out"]):
            close(got, want, f"{name}: grad {what}")
        _, _, counts = sharded(router, TOKENS * 2, x, gate, w_in, w_out)
        counts = np.asarray(counts)
        assert (counts[:, 0] == counts[:, 2]).all() and (counts[:, 1] == 0).all(), counts
        if name == "null experts":
            assert counts[:, 0].sum() < WORLD * TOKENS * 2, counts  # null rows stay home

    # Capacity 1: overflow dropped, counted, and contributes zero.
    router = cases[0][1]
    gate = jax.random.normal(keys[2], (D, E))
    y, _, counts = sharded(router, 1, x, gate, w_in, w_out)
    for shard in range(WORLD):
        mine = slice(shard * TOKENS, (shard + 1) * TOKENS)
        plan = mr.make_plan(router(x[mine] @ gate))
        ye = np.array(experts(mr.dispatch(x[mine], plan), plan.group_sizes, w_in, w_out))
        sizes = np.asarray(plan.group_sizes)
        position = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        ye[: sizes.sum()][position >= 1] = 0
        close(y[mine], mr.combine(jnp.asarray(ye), plan), f"capacity 1: y of shard {shard}")
        assert counts[shard, 1] == np.maximum(sizes - 1, 0).sum()

    # Every token picks expert 0: shards 1.. receive no real row, experts 1.. get nothing.
    logits = jnp.zeros((WORLD * TOKENS, E)).at[:, 0].set(5.0)
    router = mr.TopK(num_experts=E, k=1)
    y, sizes, _ = sharded(router, TOKENS, x, gate, w_in, w_out, logits=logits)
    plan = mr.make_plan(router(logits))
    want = mr.combine(experts(mr.dispatch(x, plan), plan.group_sizes, w_in, w_out), plan)
    close(y, want, "one expert: y")
    assert np.asarray(sizes).tolist() == [WORLD * TOKENS] + [0] * (E - 1), sizes
    print("all checks passed")


if __name__ == "__main__":
    main()
