"""
DeepSeek's auxiliary-loss-free balancing, step by step
======================================================

DeepSeek-V3 balances its experts without a loss: each expert has a bias that is added to its
score *for selection only* (:class:`~moerouter.DeepSeekTopK`), and after every step
:func:`~moerouter.update_expert_bias` moves it by ``rate · sign(mean load − load)``: overloaded
experts become less attractive, idle ones more. The weights never see the bias, so the model's
outputs are not pulled toward balance, only its choices.

A simulated router: 8 experts, ``k = 2``, 256 new tokens per step whose sigmoid scores favour
the low-numbered experts (a fixed skew plus fresh noise every step), 150 steps.
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr

E, K, T, STEPS, RATE = 8, 2, 256, 150, 0.01
rng = np.random.default_rng(0)
skew = np.linspace(1.5, -1.5, E, dtype=np.float32)
router = mr.DeepSeekTopK(num_experts=E, k=K)  # sigmoid scores, as in DeepSeek-V3

bias = np.zeros(E, dtype=np.float32)
imbalance, imbalance_fixed, biases = [], [], []
for _ in range(STEPS):
    logits = rng.standard_normal((T, E), dtype=np.float32) + skew
    load = mr.stats.summary(router(logits, bias))["tokens_per_expert"]
    imbalance.append(load.max() / load.mean())
    without = mr.stats.summary(router(logits))[
        "tokens_per_expert"
    ]  # no bias, for comparison
    imbalance_fixed.append(without.max() / without.mean())
    bias = mr.update_expert_bias(bias, load, RATE)
    biases.append(bias)

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
left.plot(imbalance_fixed, color="grey", label="no bias")
left.plot(imbalance, color="tab:blue", label=f"bias updated, rate {RATE}")
left.axhline(1.0, color="black", lw=0.8)
left.set_xlabel("step")
left.set_ylabel("busiest expert / mean load")
left.legend()
right.plot(np.stack(biases))
right.set_xlabel("step")
right.set_ylabel("expert bias")
right.set_title(
    "one line per expert: favoured ones fall, avoided ones rise", fontsize=10
)
plt.show()

print(f"busiest / mean, no bias:        {np.mean(imbalance_fixed[-50:]):.2f}")
print(f"busiest / mean, last 50 steps:  {np.mean(imbalance[-50:]):.2f}")
print("final bias:", [round(float(value), 3) for value in bias])

# %%
# The bias of the favoured experts falls and that of the avoided ones rises until every
# expert's load is near the mean; it then jitters by about ``rate`` around its balanced value
# (the sign update never settles exactly). A larger rate converges faster and jitters more.
# In data-parallel training, sum ``tokens_per_expert`` over the ranks before the update so that
# every rank keeps the same bias.
