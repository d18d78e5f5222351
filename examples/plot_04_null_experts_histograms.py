"""
AdaMoE: how many real experts a token uses
==========================================

:class:`~moerouter.NullExperts` (AdaMoE, Zeng et al. 2024) adds ``m`` null experts to the
router: a token still makes ``k`` choices, but a choice that lands on a null expert costs
nothing, so the number of *real* experts per token ranges from 0 to ``k``. The more null
columns, the more choices they win, and how many each token gets depends on how strongly its
router prefers the null columns, which training learns (here: a per-token "easiness" offset).

2048 tokens, 8 real experts, ``k = 4``, for ``m = 0, 4, 8, 16`` null experts (the AdaMoE
Mixtral run used 16 with ``k = 4``).
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr

T, E, K = 2048, 8, 4
rng = np.random.default_rng(0)
real_logits = rng.standard_normal((T, E), dtype=np.float32)
easiness = rng.standard_normal(
    (T, 1), dtype=np.float32
)  # > 0: the token prefers null experts

fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), sharey=True, layout="constrained")
for ax, num_null in zip(axes, (0, 4, 8, 16), strict=True):
    null_logits = rng.standard_normal((T, num_null), dtype=np.float32) + easiness
    router = mr.NullExperts(num_experts=E, num_null=num_null, k=K)
    routing = router(np.concatenate([real_logits, null_logits], axis=1))
    summary = mr.stats.summary(routing)
    histogram = summary[
        "real_experts_histogram"
    ]  # tokens using 0, 1, ..., k real experts
    mean = float(summary["real_experts_per_token"])
    ax.bar(range(K + 1), histogram / T, color="tab:blue" if num_null else "tab:grey")
    ax.set_title(
        f"m = {num_null} null experts\nmean {mean:.2f} real experts", fontsize=10
    )
    ax.set_xlabel("real experts per token")
    ax.set_xticks(range(K + 1))
    print(
        f"m = {num_null:2d}: tokens using 0..{K} real experts {histogram.tolist()}, "
        f"mean {mean:.2f}"
    )
axes[0].set_ylabel("share of tokens")
plt.show()

# %%
# Expert FLOPs scale with the mean: with 16 null experts this batch needs well under half the
# expert FLOPs of plain top-4, while a token the router finds hard still gets all four experts.
# How far the mean falls is set in training by :func:`moerouter.losses.null_load_balancing`,
# which balances the real experts and the null experts pooled as one bucket.
