"""
Balance without a loss: Sinkhorn, BASE and Soft MoE against top-k
=================================================================

A router that favours a few experts overloads them; top-k only fixes that through a balancing
loss, during training. Other policies balance by construction, on any logits:

* :class:`~moerouter.SinkhornTokenChoice` picks each token's expert from an entropic transport
  plan whose expert marginals are equal (nearly balanced);
* :class:`~moerouter.BalancedAssignment` (BASE layers) solves the balanced assignment: every
  expert gets exactly ``T / E`` tokens;
* :class:`~moerouter.SoftMoE` gives every expert the same number of slots, each a weighted
  average of all tokens: the compute is balanced whatever the logits.

512 tokens, 8 experts, one choice per token, logits skewed toward low-numbered experts. Bars:
each expert's share of the expert compute (rows for the sparse policies, slots for Soft MoE).
Dots: its share of the combine weight, i.e. of what the tokens' outputs are made of.
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr

T, E = 512, 8
rng = np.random.default_rng(0)
logits = rng.standard_normal((T, E), dtype=np.float32) + np.linspace(
    2, -2, E, dtype=np.float32
)


def shares(routing):
    """(compute share, combine-weight share) per expert."""
    if isinstance(routing, mr.SoftRouting):  # slot n belongs to expert n // P
        slots = np.full(E, routing.slots_per_expert, dtype=np.float64)
        weight = routing.combine_weights.reshape(T, E, -1).sum(axis=(0, 2))
        return slots / slots.sum(), weight / weight.sum()
    real = routing.expert_ids >= 0
    rows = np.bincount(routing.expert_ids[real], minlength=E).astype(np.float64)
    weight = np.bincount(routing.expert_ids[real], routing.weights[real], minlength=E)
    return rows / rows.sum(), weight / weight.sum()


policies = {
    "TopK, k = 1": mr.TopK(num_experts=E, k=1),
    "SinkhornTokenChoice": mr.SinkhornTokenChoice(num_experts=E, k=1),
    "BalancedAssignment (BASE)": mr.BalancedAssignment(num_experts=E),
    "SoftMoE, 1 slot per expert": mr.SoftMoE(num_experts=E, slots_per_expert=1),
}
fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), sharey=True, layout="constrained")
for ax, (name, policy) in zip(axes, policies.items(), strict=True):
    compute, weight = shares(policy(logits))
    ax.bar(range(E), compute, color="tab:blue", label="compute")
    ax.plot(range(E), weight, "o", color="tab:orange", label="combine weight")
    ax.axhline(1 / E, color="grey", lw=0.8)
    ax.set_title(
        f"{name}\nbusiest expert {compute.max() * E:.2f}× the mean", fontsize=10
    )
    ax.set_xlabel("expert")
    print(f"{name:28s} compute share {np.round(compute, 3).tolist()}")
axes[0].set_ylabel("share")
axes[0].legend(fontsize=8)
plt.show()

# %%
# Top-k sends over half the tokens to expert 0 and almost none to the last ones. Sinkhorn
# flattens the load to within a few tokens, BASE to exactly ``T / E``, and Soft MoE's compute is
# flat by construction. The dots show the price paid: the balanced policies send tokens to
# experts their router likes less (Sinkhorn and BASE), or, for Soft MoE, keep combining mostly
# from the favoured experts' slots. All three couple the tokens of a group, so none is causal
# (see :doc:`/policies/index`).
