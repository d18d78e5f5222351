r"""
One routing, three balancing-loss conventions
=============================================

:func:`moerouter.losses.load_balancing` is the Switch loss :math:`E \sum_e f_e P_e` in all
three ``convention`` values; they differ in how the load :math:`f_e` is normalised, and so the
same routing gives different numbers in Megatron-Core, in transformers' Mixtral and in GShard /
Flaxformer code:

* ``"megatron"``: :math:`f_e` is the share of the :math:`T k` routed choices, so a balanced
  router scores 1 for every ``k``;
* ``"mixtral"``: :math:`f_e` counts tokens, so a token's ``k`` choices each count and a balanced
  router scores ``k``;
* ``"gshard"``: computed per group of tokens and then averaged over the groups; equal to
  ``"mixtral"`` for one group.

Below: 4 groups of 128 tokens and 8 experts, routed by :class:`~moerouter.TopK` with ``k = 1,
2, 4``, for a nearly uniform router, a router skewed toward low-numbered experts, and a router
skewed differently in every group (group ``g`` favours expert ``2g``).
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr

G, S, E = 4, 128, 8
rng = np.random.default_rng(0)
noise = rng.standard_normal((G, S, E), dtype=np.float32)
scenarios = {
    "nearly uniform router": 0.05 * noise,
    "skewed router": noise + np.linspace(1.5, -1.5, E, dtype=np.float32),
    "each group skewed differently": noise
    + 2.0 * np.eye(E, dtype=np.float32)[[0, 2, 4, 6], None],
}
conventions = ("megatron", "mixtral", "gshard")
ks = (1, 2, 4)

fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True, layout="constrained")
for ax, (title, logits) in zip(axes, scenarios.items(), strict=True):
    for offset, convention in enumerate(conventions):
        values = [
            float(
                mr.losses.load_balancing(
                    mr.TopK(num_experts=E, k=k)(logits), convention=convention
                )
            )
            for k in ks
        ]
        positions = np.arange(len(ks)) + (offset - 1) * 0.27
        ax.bar(positions, values, width=0.27, label=convention)
        print(
            f"{title:30s} {convention:9s} k = 1, 2, 4: {np.round(values, 3).tolist()}"
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(ks)), [f"k = {k}" for k in ks])
    ax.set_title(title, fontsize=10)
axes[0].set_ylabel("load-balancing loss")
axes[0].legend()
plt.show()

# %%
# Three lessons. For the same routing ``"mixtral"`` is exactly ``k`` times ``"megatron"``, so a
# loss coefficient tuned with one convention is ``k`` times too strong or too weak with the
# other. A perfectly balanced router does not score 0 but 1 (``"megatron"``) or ``k``. And a
# batch can look balanced overall while every group is skewed (right): the pooled conventions
# see the skews cancel, GShard's per-group mean does not. Pick the convention of the code you
# compare against; moerouter's default is Megatron-Core's.
