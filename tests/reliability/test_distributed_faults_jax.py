"""JAX expert parallelism over 4 host devices with empty shards: the failure model, checked.

Under ``shard_map`` every shard runs one traced program, so settings cannot differ between
shards and no shard can raise while the others wait: of the torch faults, only empty shards
apply. A shard whose tokens all route nowhere (padding rows with ``-inf`` logits) and shards with
``T = 0`` still take part in every all-to-all, and outputs and gradients equal one device's.

XLA fixes the number of host devices when JAX starts, so the checks run in a fresh interpreter
(this file run as a script) with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; the
subprocess is killed after 60 s, so a hang fails the test.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

WORLD, TOKENS, D, E, K = 4, 4, 8, 8, 2  # tokens per shard; two experts per shard
CAPACITY = TOKENS * K  # rows per expert per shard: nothing is dropped


@pytest.mark.slow  # a fresh JAX process compiling sharded gradients: tens of seconds
def test_empty_shards_take_part_in_every_exchange():
    for module in ("jax", "moerouter_jax"):  # looked up, not imported: the child imports them
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",  # compiling, not running, is the cost here
    )
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout


def empty_routing(logits):
    """The routing of zero tokens, built by hand: the exchange must not depend on the core's
    policies, which refuse T = 0 until the core's zero-token fix lands (issue 14, item 9)."""
    import jax
    import jax.numpy as jnp

    import moerouter as mr

    no_ids = jnp.zeros(0, jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)
    return mr.Routing(
        token_ids=no_ids,
        expert_ids=no_ids,
        weights=probs.reshape(-1),
        choice_ids=no_ids,
        probs=probs,
        finite_rows=jnp.zeros(0, bool),
        num_tokens=0,
        num_experts=E,
        layout="token",
        slots=K,
    )


def route(logits, padding):
    """Top-k, with the rows where ``padding`` holds set to ``-inf``: they route nowhere."""
    import jax.numpy as jnp

    import moerouter as mr

    if logits.shape[0] == 0:
        return empty_routing(logits)
    return mr.TopK(num_experts=E, k=K)(jnp.where(padding[:, None], -jnp.inf, logits))


def linear_experts(rows, group_sizes, w):
    """One linear map per expert on moerouter-grouped rows; zero past ``sum(group_sizes)``."""
    import jax.numpy as jnp

    expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right")
    out = jnp.einsum("nd,nde->ne", rows, w[jnp.minimum(expert, w.shape[0] - 1)])
    return jnp.where((expert < w.shape[0])[:, None], out, 0.0)


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from moerouter_jax import distributed

    import moerouter as mr

    assert jax.device_count() == WORLD, jax.devices()
    mesh = jax.make_mesh((WORLD,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))

    def single(x, gate, w, padding, upstream):
        plan = mr.make_plan(route(x @ gate, padding))
        y = mr.combine(linear_experts(mr.dispatch(x, plan), plan.group_sizes, w), plan)
        return jnp.sum(y * upstream), y

    def sharded(x, gate, w, padding, upstream):
        def shard(x, gate, w, padding):
            plan = mr.make_plan(route(x @ gate, padding))
            exchange = distributed.dispatch(x, plan, axis_name="ep", capacity=CAPACITY)
            ye = linear_experts(exchange.rows, exchange.group_sizes, w)
            y = distributed.combine(ye, exchange, axis_name="ep")
            return y, jnp.sum(plan.group_sizes)[None], jnp.sum(exchange.group_sizes)[None]

        y, sent, served = jax.shard_map(
            shard,
            mesh=mesh,
            in_specs=(P("ep"), P(), P("ep"), P("ep")),
            out_specs=(P("ep"), P("ep"), P("ep")),
        )(x, gate, w, padding)
        return jnp.sum(y * upstream), (y, sent, served)

    arguments = (0, 1, 2)  # x, gate, w
    reference = jax.jit(jax.grad(single, arguments, has_aux=True))
    parallel = jax.jit(jax.grad(sharded, arguments, has_aux=True))
    keys = jax.random.split(jax.random.key(0), 4)
    gate = jax.random.normal(keys[0], (D, E))
    w = jax.random.normal(keys[1], (E, D, D)) / D**0.5

    def close(got, want, what):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), 1e-5, 1e-5, err_msg=what)

    # Shard 1's tokens are all padding: it sends no real row, still serves experts 2 and 3.
    x = jax.random.normal(keys[2], (WORLD * TOKENS, D))
    upstream = jax.random.normal(keys[3], (WORLD * TOKENS, D))
    padding = (jnp.arange(WORLD * TOKENS) // TOKENS) == 1
    want_grads, want_y = reference(x, gate, w, padding, upstream)
    grads, (y, sent, served) = parallel(x, gate, w, padding, upstream)
    close(y, want_y, "padded shard: y")
    for got, want, what in zip(grads, want_grads, ["x", "gate", "w"], strict=True):
        close(got, want, f"padded shard: gradient of {what}")
    assert int(sent[1]) == 0 and int(sent.sum()) == int(served.sum()) > 0, (sent, served)
    assert not np.asarray(y[TOKENS : 2 * TOKENS]).any(), "padding rows must come back zero"

    # Every shard has T = 0: every all-to-all still runs, on zero rows of real data.
    empty = jnp.zeros((0, D))
    grads, (y, sent, served) = parallel(empty, gate, w, jnp.zeros(0, bool), empty)
    assert y.shape == (0, D) and grads[0].shape == (0, D), (y.shape, grads[0].shape)
    assert not np.asarray(grads[1]).any() and not np.asarray(grads[2]).any()
    assert int(sent.sum()) == 0 and int(served.sum()) == 0, (sent, served)
    print("all checks passed")


if __name__ == "__main__":
    main()
