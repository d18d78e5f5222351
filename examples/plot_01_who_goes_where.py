"""
Who goes where: top-k, AdaMoE and expert choice
===============================================

One batch of 24 tokens and 8 experts, routed three ways. Each panel is the token × expert
matrix of combine weights: a coloured cell is an expert that processes the token, its colour
the weight of that expert's output.

* :class:`~moerouter.TopK` (``k = 2``): every row has exactly two cells.
* :class:`~moerouter.NullExperts` (AdaMoE, 8 null experts, ``k = 2``): a choice that lands on a
  null expert costs nothing, so rows have 0, 1 or 2 real cells. Here the null columns score
  higher for the second half of the batch ("easy" tokens), which therefore use fewer experts.
* :class:`~moerouter.ExpertChoice` (capacity factor 1): every *column* has exactly
  ``C = 24 / 8 = 3`` cells; a token may be taken by several experts or by none.
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr

T, E, NULL = 24, 8, 8
rng = np.random.default_rng(0)
logits = rng.standard_normal((T, E), dtype=np.float32)
# Null-expert logits: higher for the "easy" second half of the batch.
easiness = np.where(np.arange(T) < T // 2, -1.0, 0.8).astype(np.float32)
null_logits = rng.standard_normal((T, NULL), dtype=np.float32) * 0.5 + easiness[:, None]

routings = {
    "TopK, k = 2": mr.TopK(num_experts=E, k=2)(logits),
    "NullExperts (AdaMoE), k = 2": mr.NullExperts(num_experts=E, num_null=NULL, k=2)(
        np.concatenate([logits, null_logits], axis=1)
    ),
    "ExpertChoice, capacity factor 1": mr.ExpertChoice(
        num_experts=E, capacity_factor=1.0
    )(logits),
}


def combine_matrix(routing):
    """(T, E) combine weights: 0 where the token does not reach the expert."""
    dense = np.zeros((routing.num_tokens, routing.num_experts), dtype=np.float32)
    real = routing.expert_ids >= 0
    dense[routing.token_ids[real], routing.expert_ids[real]] = routing.weights[real]
    return dense


fig, axes = plt.subplots(1, 3, figsize=(10, 4.8), sharey=True, layout="constrained")
for ax, (title, routing) in zip(axes, routings.items(), strict=True):
    matrix = combine_matrix(routing)
    image = ax.imshow(
        np.ma.masked_equal(matrix, 0), cmap="viridis", vmin=0, vmax=1, aspect="auto"
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert")
    ax.set_xticks(range(E))
    per_token = (matrix > 0).sum(axis=1)
    print(f"{title:32s} real experts per token: {per_token.tolist()}")
axes[0].set_ylabel("token")
fig.colorbar(image, ax=axes, shrink=0.8, label="combine weight")
plt.show()

# %%
# Top-k spends the same compute on every token. AdaMoE spends less where the null experts win
# (the lower half), and expert choice balances the experts exactly at the price of tokens that
# no expert took (empty rows): their output is zero, which is why expert choice suits encoders
# with a residual connection, not causal decoders.
