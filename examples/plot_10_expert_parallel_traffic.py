"""
Expert parallelism: who sends what to whom
==========================================

With expert parallelism each rank holds a block of the experts, and every MoE layer exchanges
rows with an all-to-all: a token's row travels to the rank of each real expert it chose, and
back. :mod:`moerouter.simulate` computes that traffic from the routing alone, exactly as
``moerouter_torch.distributed`` sends it (its tests count the bytes of real Gloo runs), so a
routing policy can be judged on a cluster you do not have.

16 ranks in 4 nodes, 64 experts (4 per rank), 4096 tokens (256 per rank), Zipf-skewed router
logits: plain top-8 against AdaMoE with 32 null experts at ``k = 8``. Null experts keep rows
off the network; the heatmaps show the bytes rank ``s`` (row) sends rank ``r`` (column) in
dispatch, and the bars the rows each rank's experts process.
"""

import matplotlib.pyplot as plt
import numpy as np

import moerouter as mr
from moerouter import simulate, workloads

W, PER_NODE, E, K, NULL = 16, 4, 64, 8, 32
T = 256 * W
topology = simulate.Topology(world_size=W, ranks_per_node=PER_NODE)

real = workloads.zipf(T, E, exponent=1.1, seed=0)
# AdaMoE's null columns, each as likely as an average real expert (as the simulate command
# models them): Gumbel noise at log(1 / E).
null = np.log(1.0 / E) - np.log(-np.log(np.random.default_rng(1).random((T, NULL))))
routers = {
    "top-8": (mr.TopK(num_experts=E, k=K), real),
    "AdaMoE +32 null": (
        mr.NullExperts(num_experts=E, num_null=NULL, k=K),
        np.concatenate([real, null.astype(np.float32)], axis=1),
    ),
}

results = {}
for name, (router, logits) in routers.items():
    results[name] = simulate.run(router(logits), topology=topology, hidden_size=2048)
    totals = results[name].totals()
    print(
        f"{name:16s} real experts/token {totals['real_experts_per_token']:.2f}  "
        f"inter-node rows {totals['inter_node_share']:.1%}  "
        f"busiest rank {totals['rank_max_over_mean']:.2f}x the mean  "
        f"all-to-all {1e3 * totals['step_time']:.2f} ms"
    )

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
scale = max(float(r.dispatch_bytes.max()) for r in results.values()) / 2**20
for ax, (name, result) in zip(axes[:2], results.items(), strict=True):
    image = ax.imshow(result.dispatch_bytes / 2**20, cmap="viridis", vmin=0, vmax=scale)
    ax.set_title(f"{name}: dispatch MiB, rank to rank", fontsize=10)
    ax.set_xlabel("to rank")
    ax.set_ylabel("from rank")
    for edge in range(PER_NODE, W, PER_NODE):  # node boundaries
        ax.axhline(edge - 0.5, color="white", linewidth=0.6)
        ax.axvline(edge - 0.5, color="white", linewidth=0.6)
fig.colorbar(image, ax=axes[:2], shrink=0.8, label="MiB")

width = 0.4
for offset, (name, result) in zip(
    (-width / 2, width / 2), results.items(), strict=True
):
    axes[2].bar(np.arange(W) + offset, result.rank_load[0], width=width, label=name)
axes[2].set_title("rows each rank's experts process", fontsize=10)
axes[2].set_xlabel("rank")
axes[2].legend(fontsize=8)
plt.show()

# %%
# The diagonal blocks are traffic inside a node; everything else crosses the slower inter-node
# links. Null experts cut every cell of the matrix by the share of choices they take, but the
# hot experts of a skewed router still receive from every rank, so the busiest rank, which sets
# the all-to-all time, gains less than the byte total suggests. Locality-aware routing
# (:class:`moerouter.LocalityTopK`) attacks the inter-node share instead; the
# :doc:`/simulate` page compares the three at 256 ranks.
