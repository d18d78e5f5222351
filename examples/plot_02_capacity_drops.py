"""
Capacity: what gets dropped, and whose
======================================

With a ``capacity_factor``, each expert takes at most
``C = ceil(capacity_factor · T · k / E)`` assignments; the rest are dropped (expert -1,
weight 0). Which ones is the ``drop_policy``'s choice. Every policy serves all first choices
before any second choice; within a rank, ``"position"`` serves tokens in order, ``"probs"`` by
descending probability of that choice, and ``"batch_priority"`` (V-MoE) by the token's
*first*-choice probability, so unsure tokens lose first.

512 tokens, 8 experts, ``k = 2``, logits with a popularity skew: expert 0 is favoured, expert 7
avoided, so drops start before the capacity factor reaches 1.
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr

T, E, K = 512, 8, 2
rng = np.random.default_rng(0)
popularity = np.linspace(1.0, -1.0, E, dtype=np.float32)
logits = rng.standard_normal((T, E), dtype=np.float32) * 1.5 + popularity

uncapped = mr.TopK(num_experts=E, k=K)(logits)
weights = uncapped.weights.reshape(T, K)  # weights before any drop
confidence = uncapped.probs.max(axis=1)  # the router's first-choice probability

factors = np.arange(0.25, 1.76, 0.125)
policies = ("position", "probs", "batch_priority")
dropped, weight_lost, who = ({p: [] for p in policies} for _ in range(3))
for policy in policies:
    for factor in factors:
        router = mr.TopK(
            num_experts=E, k=K, capacity_factor=float(factor), drop_policy=policy
        )
        routing = router(logits)
        lost = routing.expert_ids.reshape(T, K) < 0
        dropped[policy].append(float(mr.stats.summary(routing)["dropped_fraction"]))
        weight_lost[policy].append(weights[lost].sum() / T)
        first_lost = lost[:, 0]
        who[policy].append(
            confidence[first_lost].mean() if first_lost.any() else np.nan
        )

fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
styles = {"position": "o-", "probs": "s--", "batch_priority": "^:"}
for policy in policies:
    axes[0].plot(factors, dropped[policy], styles[policy], label=policy, ms=4)
    axes[1].plot(factors, weight_lost[policy], styles[policy], label=policy, ms=4)
    axes[2].plot(factors, who[policy], styles[policy], label=policy, ms=4)
axes[2].axhline(confidence.mean(), color="grey", lw=0.8, label="all tokens")
titles = (
    "dropped share of the T·k choices",
    "routing weight lost per token",
    "confidence of tokens losing their 1st choice",
)
for ax, title in zip(axes, titles, strict=True):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("capacity factor")
axes[0].legend()
axes[2].legend(fontsize=8)
plt.show()

for policy in policies:
    at_one = list(factors).index(1.0)
    print(
        f"capacity factor 1, {policy:15s} "
        f"dropped {dropped[policy][at_one]:.3f} of the choices, "
        f"lost {weight_lost[policy][at_one]:.3f} of the weight"
    )

# %%
# The drop policy decides *who* is dropped, never *how many*: the left curves coincide, since
# the capacity and the k-major order fix the count. For first choices ``"probs"`` and
# ``"batch_priority"`` rank tokens alike (a token's first-choice probability *is* its
# confidence), so with either the tokens that lose their first expert are the unsure ones
# (right, below the batch mean), while ``"position"`` drops whoever comes last. They differ on
# second choices: ``"probs"`` keeps the heaviest and so loses the least routing weight
# (middle); ``"batch_priority"`` still ranks by confidence, keeping confident tokens' light
# second choices over unsure tokens' heavier ones, and loses more than ``"probs"`` (the most
# of all near a capacity factor of 1): V-MoE's trade, which serves confident tokens whole.
