r"""An expert-parallel simulator: what routing costs on a cluster, computed on one CPU.

:func:`run` takes routing calls (a :class:`moerouter.traces.Trace`, routings from any policy,
or expert-id arrays, e.g. from :mod:`moerouter.workloads` logits routed by a policy), a
:class:`Topology` and an expert placement (:func:`place_experts`), and reports per call (a
layer at a step) and in total: the rank-to-rank byte matrices of dispatch, combine and the
control exchange (header and counts), the load per expert and per rank, dropped rows, the
share of rows that stay on their rank, their node or cross nodes, the share saved by null
experts and by locality, and the all-to-all time under the cost model below.

What travels is exactly what ``moerouter_torch.distributed`` sends (its tests count the bytes
of real Gloo runs and compare): per call, a control exchange (the 344-byte header every rank
all-gathers, then a counts all-to-all: each rank sends each rank one int64 count per expert
that rank holds), the dispatch all-to-all (dropless: only rows of real
experts, uneven splits; static capacity ``C``: ``C`` rows per expert from every rank, padding
included, rows past ``C`` dropped), and the combine all-to-all (the dispatch transposed). A
rank's rows to itself are part of the all-to-all too; the byte matrices include them on the
diagonal and the cost model treats them as free local copies.

Tokens start on ranks in ``W`` contiguous near-equal blocks (each rank's own micro-batch; or
``token_ranks=``). A row is ``hidden_size * bytes_per_element`` bytes.

Cost model
----------

For one all-to-all with byte matrix :math:`B` (:math:`B_{s,r}` bytes from rank :math:`s` to
rank :math:`r`), each rank's intra-node bytes (to or from other ranks of its node) use its
intra-node link and its inter-node bytes its NIC, both at once, each full duplex:

.. math::

    t_r = \max\left(\frac{\mathrm{out}^{\mathrm{intra}}_r}{\beta_{\mathrm{intra}}},
                     \frac{\mathrm{in}^{\mathrm{intra}}_r}{\beta_{\mathrm{intra}}},
                     \frac{\mathrm{out}^{\mathrm{inter}}_r}{\beta_{\mathrm{inter}}},
                     \frac{\mathrm{in}^{\mathrm{inter}}_r}{\beta_{\mathrm{inter}}}\right),
    \qquad
    T = \max_r t_r + \alpha,

with :math:`\alpha` the inter-node latency if any byte crosses nodes, else the intra-node
latency if any byte crosses ranks, else 0. The slowest rank sets the pace, so load imbalance
shows up as time. The model ignores congestion inside the network, protocol overheads and
overlap with computation: it is a first-order estimate to compare routings and placements, not
a prediction of wall time. A call costs its control exchange, its dispatch and its combine (the
model is symmetric, so combine costs what dispatch costs).

Examples
--------
>>> import moerouter as mr
>>> from moerouter import simulate, workloads
>>> topology = simulate.Topology(world_size=8, ranks_per_node=4)
>>> logits = workloads.zipf(8 * 64, 16, exponent=1.2, seed=0)
>>> result = simulate.run(mr.TopK(num_experts=16, k=2)(logits), topology=topology)
>>> int(result.dispatch_bytes.sum()) == 8 * 64 * 2 * result.row_bytes
True
"""

from moerouter.simulate._model import SimulationResult, run
from moerouter.simulate._topology import COUNT_BYTES, HEADER_BYTES, Topology, place_experts

__all__ = ["COUNT_BYTES", "HEADER_BYTES", "SimulationResult", "Topology", "place_experts", "run"]
