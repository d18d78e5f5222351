"""
The same routing on NumPy, PyTorch and JAX
==========================================

moerouter's policies are written once against the Python array API, and each framework's plugin
provides kernels that must return what that code returns. So the same logits give the same
decision on every backend: identical expert ids, weights equal to float32 rounding. Here one
batch goes through three policies and a whole MoE step (plan, dispatch, a stand-in expert,
combine, loss) on each framework, and every result is compared with NumPy's.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch

import moerouter as mr
from moerouter.testing import assert_routing_equal, to_numpy

T, E, NULL, D = 256, 8, 8, 16
torch.set_num_threads(1)  # arrays this small run faster without thread synchronisation
rng = np.random.default_rng(0)
x = rng.standard_normal((T, D), dtype=np.float32)
logits = rng.standard_normal((T, E + NULL), dtype=np.float32)
policies = {
    "TopK": (mr.TopK(num_experts=E, k=2), logits[:, :E]),
    "NullExperts": (mr.NullExperts(num_experts=E, num_null=NULL, k=2), logits),
    "ExpertChoice": (
        mr.ExpertChoice(num_experts=E, capacity_factor=1.0),
        logits[:, :E],
    ),
}
frameworks = {"numpy": np.asarray, "torch": torch.asarray, "jax": jnp.asarray}


def moe_step(policy, logits, x):
    """Route, move rows to the experts and back; the "experts" halve their rows."""
    routing = policy(logits)
    plan = mr.make_plan(routing)
    y = mr.combine(mr.dispatch(x, plan) * 0.5, plan)
    load = mr.stats.summary(routing)["tokens_per_expert"]
    return routing, y, mr.losses.load_balancing(routing), load


# JAX runs the step under jax.jit: one compiled program per policy (the policy, a frozen
# dataclass, is a static argument), instead of one small compilation per operation.
steps = {
    "numpy": moe_step,
    "torch": moe_step,
    "jax": jax.jit(moe_step, static_argnums=0),
}

loads = {}
for name, (policy, policy_logits) in policies.items():
    reference = moe_step(policy, policy_logits, x)
    for framework, asarray in frameworks.items():
        routing, y, loss, load = steps[framework](
            policy, asarray(policy_logits), asarray(x)
        )
        assert_routing_equal(
            routing, reference[0]
        )  # ids identical, weights to rounding
        y_error = np.abs(to_numpy(y) - reference[1]).max()
        loss_error = abs(float(to_numpy(loss)) - float(reference[2]))
        loads[name, framework] = to_numpy(load)
        print(
            f"{name:12s} {framework:5s} {type(routing.weights).__name__:8s} "
            f"max |y - y_numpy| = {y_error:.1e}, |loss - loss_numpy| = {loss_error:.1e}"
        )

fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True, layout="constrained")
for ax, name in zip(axes, policies, strict=True):
    for offset, framework in enumerate(frameworks):
        positions = np.arange(E) + (offset - 1) * 0.27
        ax.bar(positions, loads[name, framework], width=0.27, label=framework)
    ax.set_title(f"{name}: tokens per expert", fontsize=10)
    ax.set_xlabel("expert")
axes[0].legend()
plt.show()

# %%
# Every routing matched NumPy's exactly in its integer fields (the assertion above would have
# stopped the build otherwise), so the three bars of each expert are equal. The outputs agree to
# float32 rounding or better: every backend accumulates ``combine`` in float32 in the same slot
# order. One caveat, explained in :doc:`/concepts`: expert choice compares probabilities of
# different tokens, so two tokens whose probabilities agree to the last float32 bit may be
# ranked differently by two backends.
