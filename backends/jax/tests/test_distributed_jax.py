"""Expert parallelism over 4 host devices equals the single-device layer, gradients included.

XLA fixes the number of host devices when JAX starts, so the checks run in a fresh interpreter
(this file run as a script) with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, one
check per process so that each ends within 60 s on 2 loaded cores (killed after that: a hang
fails), with XLA's optimisation passes off: compiling, not running, costs the time here.
"""

import os
import subprocess
import sys

import pytest

WORLD, TOKENS, D, H, E = 4, 6, 8, 12, 8  # tokens per shard; two experts per shard


@pytest.mark.slow  # a fresh JAX process compiling sharded gradients: tens of seconds
@pytest.mark.parametrize(
    "part",
    [
        "top-k",  # nothing dropped: the single device matched
        "null experts",  # the same, and null-expert rows never leave their shard
        "capacity 1",  # each shard's overflow dropped, counted, zero in the output
        "one expert",  # every token to expert 0: shards 1.. receive no real row
    ],
)
def test_expert_parallel_over_four_devices(part):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
    )
    done = subprocess.run(
        [sys.executable, __file__, part], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{part}: all checks passed" in done.stdout


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


@pytest.mark.parametrize(
    ("capacity", "error", "message"),
    [
        (True, TypeError, "capacity must be an int, got bool"),  # was taken as 1
        (2.0, TypeError, "capacity must be an int, got float"),
        (None, TypeError, "capacity must be an int, got NoneType"),
        (0, ValueError, "capacity must be >= 1, got 0"),
    ],
)
def test_capacity_checked(capacity, error, message):
    """Checked before anything is traced, so no mesh is needed to see the error."""
    import jax.numpy as jnp
    from moerouter_jax import distributed

    import moerouter as mr

    plan = mr.make_plan(mr.TopK(num_experts=E, k=2)(jnp.zeros((TOKENS, E))))
    with pytest.raises(error, match=message):
        distributed.dispatch(jnp.zeros((TOKENS, D)), plan, axis_name="ep", capacity=capacity)


def test_capacity_accepts_any_index():
    """A NumPy integer is an index, as for NumPy and the array API; the check passes it (the
    call then needs the mesh axis, which this test does not have)."""
    import numpy as np
    from moerouter_jax.distributed import _check_capacity

    assert _check_capacity(np.int64(3)) == 3 and type(_check_capacity(np.int64(3))) is int


def test_padded_plan_refused():
    """A padded plan's real rows are not packed by expert: sending them would mix in padding."""
    import jax.numpy as jnp
    from moerouter_jax import distributed

    import moerouter as mr

    routing = mr.TopK(num_experts=E, k=2, capacity_factor=1.0)(jnp.zeros((TOKENS, E)))
    plan = mr.make_plan(routing, pad_to_capacity=True)
    with pytest.raises(ValueError, match="plan must be packed"):
        distributed.dispatch(jnp.zeros((TOKENS, D)), plan, axis_name="ep", capacity=2)


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


def to_expert_zero(logits):
    """A router that sends every token to expert 0 whatever its logits."""
    import jax.numpy as jnp

    import moerouter as mr

    return mr.TopK(num_experts=E, k=1)(jnp.zeros_like(logits).at[:, 0].set(5.0))


def main(part):
    """The checks of ``part``, each jitted: eager shard_map would compile every primitive."""
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

    def layer(router, capacity, x, gate, w_in, w_out, upstream):
        """One device, every expert local; rows past ``capacity`` in a group dropped."""
        plan = mr.make_plan(router(x @ gate))
        ye = experts(mr.dispatch(x, plan), plan.group_sizes, w_in, w_out)
        ends = jnp.cumsum(plan.group_sizes)
        row = jnp.arange(plan.num_rows)
        expert = jnp.minimum(jnp.searchsorted(ends, row, side="right"), E - 1)
        position = row - (ends[expert] - plan.group_sizes[expert])
        ye = jnp.where((position < capacity)[:, None], ye, 0.0)
        y = mr.combine(ye, plan)
        return jnp.sum(y * upstream), (y, plan.group_sizes)

    def sharded(router, capacity, x, gate, w_in, w_out, upstream):
        def shard(x, gate, w_in, w_out):
            plan = mr.make_plan(router(x @ gate))
            exchange = distributed.dispatch(x, plan, axis_name="ep", capacity=capacity)
            ye = experts(exchange.rows, exchange.group_sizes, w_in, w_out)
            y = distributed.combine(ye, exchange, axis_name="ep")
            real = jnp.sum(plan.group_sizes)
            counts = jnp.stack([exchange.rows_real, exchange.rows_dropped, real])
            return y, exchange.group_sizes, counts[None]

        y, sizes, counts = jax.shard_map(
            shard,
            mesh=mesh,
            in_specs=(P("ep"), P(), P("ep"), P("ep")),
            out_specs=(P("ep"), P("ep"), P("ep")),
        )(x, gate, w_in, w_out)
        return jnp.sum(y * upstream), (y, sizes, counts)

    arguments = (2, 3, 4, 5)  # x, gate, w_in, w_out
    reference = jax.jit(jax.grad(layer, arguments, has_aux=True), static_argnums=(0, 1))
    parallel = jax.jit(jax.grad(sharded, arguments, has_aux=True), static_argnums=(0, 1))

    def close(got, want, what):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), 1e-5, 1e-5, err_msg=what)

    def check(name, router, capacity, gate, want_y, want_grads):
        grads, (y, sizes, counts) = parallel(router, capacity, x, gate, w_in, w_out, upstream)
        close(y, want_y, f"{name}: y")
        for got, want, what in zip(grads, want_grads, ["x", "gate", "w_in", "w_out"], strict=True):
            close(got, want, f"{name}: gradient of {what}")
        return np.asarray(sizes), np.asarray(counts)

    gate = jax.random.normal(keys[2], (D, E))
    top2 = mr.TopK(num_experts=E, k=2)
    null = mr.NullExperts(num_experts=E, num_null=E, k=2)
    null_gate = jax.random.normal(keys[2], (D, 2 * E))
    if part in ("top-k", "null experts"):
        router, gate_in = (top2, gate) if part == "top-k" else (null, null_gate)
        # Capacity T * k per expert per shard: nothing is dropped, one device is matched.
        grads, (y, _) = reference(router, TOKENS * 2, x, gate_in, w_in, w_out, upstream)
        _, counts = check(part, router, TOKENS * 2, gate_in, y, grads)
        assert (counts[:, 0] == counts[:, 2]).all() and (counts[:, 1] == 0).all(), counts
        if router is null:
            assert counts[:, 0].sum() < WORLD * TOKENS * 2, counts  # null rows never leave

    if part == "capacity 1":
        # Each shard's overflow is dropped (as on one device with the same capacity over that
        # shard's tokens), counted, and contributes zero; gradients still match.
        want_y, want_grad_x, want_dropped = [], [], []
        want_grads = [jnp.zeros_like(gate), jnp.zeros_like(w_in), jnp.zeros_like(w_out)]
        for shard in range(WORLD):
            mine = slice(shard * TOKENS, (shard + 1) * TOKENS)
            grads, (y, sizes) = reference(top2, 1, x[mine], gate, w_in, w_out, upstream[mine])
            want_y.append(y)
            want_grad_x.append(grads[0])
            want_grads = [total + grad for total, grad in zip(want_grads, grads[1:], strict=True)]
            want_dropped.append(int(np.maximum(np.asarray(sizes) - 1, 0).sum()))
        want_grads = [jnp.concatenate(want_grad_x), *want_grads]
        _, counts = check(part, top2, 1, gate, jnp.concatenate(want_y), want_grads)
        assert counts[:, 1].tolist() == want_dropped and sum(want_dropped) > 0, counts

    if part == "one expert":
        # Every token picks expert 0: shards 1.. receive no real row, experts 1.. get none.
        everything = WORLD * TOKENS  # one device: expert 0 takes every token
        grads, (y, _) = reference(to_expert_zero, everything, x, gate, w_in, w_out, upstream)
        sizes, counts = check(part, to_expert_zero, TOKENS, gate, y, grads)
        assert sizes.tolist() == [WORLD * TOKENS] + [0] * (E - 1), sizes
    print(f"{part}: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
