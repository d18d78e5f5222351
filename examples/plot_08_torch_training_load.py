"""
Training a tiny MoE in PyTorch: expert load over the steps
==========================================================

:class:`moerouter_torch.MoE` is a whole MoE layer: a linear gate, any moerouter policy,
:class:`~moerouter_torch.GroupedMLP` experts that compute only the rows routed to them, and
the balancing losses, returned for you to weigh. Here it learns a regression task whose inputs
come from 4 clusters, each with its own target map, once without and once with the
load-balancing loss. The heatmaps show how many of the 512 tokens of each step went to each
expert (``k = 2``, so 128 per expert is perfect balance).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from moerouter_torch import MoE

import moerouter as mr

E, K, D, T, STEPS = 8, 2, 16, 512, 60
torch.set_num_threads(
    1
)  # matrices this small run faster without thread synchronisation
torch.manual_seed(0)
centres = torch.randn(4, D) * 2
targets = torch.randn(4, D, D) / D**0.5


def batch():
    """Tokens around 4 cluster centres; each cluster has its own linear target."""
    cluster = torch.randint(0, 4, (T,))
    x = centres[cluster] + torch.randn(T, D)
    return x, torch.einsum("td,tde->te", x, targets[cluster])


def train(balance_coefficient):
    torch.manual_seed(1)  # the same initial model for both runs
    layer = MoE(D, 32, mr.TopK(num_experts=E, k=K))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    loads, errors = [], []
    for _ in range(STEPS):
        x, target = batch()
        y, losses = layer(x)
        error = torch.nn.functional.mse_loss(y, target)
        loss = error + balance_coefficient * losses["load_balancing"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # the routing of this batch, for the picture
            routing = layer.router(layer.gate(x))
            loads.append(mr.stats.summary(routing)["tokens_per_expert"].numpy())
        errors.append(error.item())
    return np.stack(loads, axis=1), errors


# A coefficient of 1 is large; it makes the effect visible in 60 steps (real runs use about
# 0.01 over many thousand steps).
runs = {"no balancing loss": train(0.0), "balancing loss × 1": train(1.0)}

fig, axes = plt.subplots(
    1,
    3,
    figsize=(13, 3.6),
    layout="constrained",
    gridspec_kw={"width_ratios": [2, 2, 1.3]},
)
for ax, (name, (loads, _)) in zip(axes[:2], runs.items(), strict=True):
    image = ax.imshow(loads, aspect="auto", cmap="magma", vmin=0, vmax=T * K / E * 2)
    ax.set_title(f"{name}: tokens per expert", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
fig.colorbar(image, ax=axes[:2], label=f"tokens (balanced: {T * K // E})")
for name, (loads, errors) in runs.items():
    axes[2].plot(errors, label=name)
    print(
        f"{name:22s} final error {errors[-1]:.3f}, final load {loads[:, -1].tolist()}"
    )
axes[2].set_yscale("log")
axes[2].set_xlabel("step")
axes[2].set_title("regression error", fontsize=10)
axes[2].legend(fontsize=8)
plt.show()

# %%
# Without the loss the router settles on whatever split first helps the task, here leaving
# one expert idle and another doubly loaded; with it the load evens out while the error falls
# as fast. The loss is :func:`moerouter.losses.load_balancing` (Megatron-Core's convention, 1.0
# when balanced), so its coefficient means the same whatever ``k`` is.
