"""The expert-parallel model: who sends how many rows to whom, and how long the all-to-alls take.

Everything runs in NumPy on the host, vectorised per layer: one ``bincount`` over the layer's
assignments gives the rows each rank sends to each expert; every other figure comes from that
``(world, experts)`` count table and ``(world, world)`` matrices. :func:`run` and
:class:`SimulationResult` are here; the cluster is in ``_topology`` and the counting in
``_counting``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moerouter._validation import check_int_at_least as _check_int
from moerouter.policies._common import capacity as capacity_rows
from moerouter.simulate._counting import _count_rows, _decisions, _policy_figures, _Ranks
from moerouter.simulate._topology import (
    COUNT_BYTES,
    HEADER_BYTES,
    Topology,
    _check_rate,
    place_experts,
)
from moerouter.traces import to_numpy

__all__ = ["SimulationResult", "run"]

_PER_LAYER_INT = (
    "layer",
    "step",
    "tokens",
    "choices",
    "null_choices",
    "policy_dropped",
    "real_rows",
    "rows_sent",
    "capacity_dropped",
    "local_rows",
    "intra_node_rows",
    "inter_node_rows",
)


_PER_LAYER_FLOAT = ("count_time", "dispatch_time", "combine_time", "baseline_inter_node_rows")


@dataclass
class SimulationResult:
    """Every figure of a simulated run, per routing call (a layer at a step) and in total.

    Per-call arrays have a leading axis of length ``L`` (the calls, in input order). Rows are
    (token, expert) assignments; a row is ``hidden_size * bytes_per_element`` bytes.

    Attributes
    ----------
    topology : Topology
    placement : ndarray (E,) int64
        Rank of each expert.
    row_bytes : int
        Bytes per row.
    capacity : int or None
        Rows per (source rank, expert) in static-capacity mode (the last call's, when a
        capacity factor gives each call its own); None for dropless.
    names : list of str
        Each call's label.
    layer, step : ndarray (L,) int64
    tokens_per_expert : ndarray (L, E) int64
        Rows each expert receives from the routing, before the simulated capacity (what
        :func:`moerouter.stats.summary` reports).
    expert_load : ndarray (L, E) int64
        Rows each expert processes, after the simulated capacity.
    rank_load : ndarray (L, W) int64
        Real rows each rank's experts process.
    tokens, choices, null_choices, policy_dropped : ndarray (L,) int64
        Tokens with finite logits, their choices, the choices of a null expert, and the choices
        of a real expert the policy dropped (capacity, -inf logit).
    real_rows : ndarray (L,) int64
        Assignments to a real expert (before the simulated capacity).
    rows_sent : ndarray (L,) int64
        Rows on the wire per direction, every rank's own share included (padding included in
        capacity mode).
    capacity_dropped : ndarray (L,) int64
        Real rows over the simulated capacity (never sent; their output is zero).
    local_rows, intra_node_rows, inter_node_rows : ndarray (L,) int64
        Real rows that stay on their rank, cross ranks inside a node, cross nodes.
    baseline_inter_node_rows : ndarray (L,) float64
        The inter-node rows if every row's destination were uniform over the ranks.
    count_time, dispatch_time, combine_time : ndarray (L,) float64
        Seconds of the control exchange (header all-gather and counts) and of the dispatch and
        combine all-to-alls.
    dispatch_bytes, combine_bytes, count_bytes : ndarray (W, W) int64
        Bytes rank ``s`` sends rank ``r`` (row ``s``, column ``r``) summed over all calls:
        dispatched rows, combined rows (the transpose) and the control exchange (the header,
        then the counts).
    layer_dispatch_bytes : ndarray (L, W, W) int64 or None
        Per call, with ``keep_matrices=True``.
    """

    topology: Topology
    placement: np.ndarray
    row_bytes: int
    capacity: int | None
    names: list[str] = field(default_factory=list)
    layer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens_per_expert: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    expert_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    rank_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    choices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    null_choices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    policy_dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    real_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rows_sent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    capacity_dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    local_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    intra_node_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inter_node_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    baseline_inter_node_rows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    count_time: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dispatch_time: np.ndarray = field(default_factory=lambda: np.zeros(0))
    combine_time: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dispatch_bytes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    combine_bytes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    count_bytes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    layer_dispatch_bytes: np.ndarray | None = None

    @property
    def num_calls(self) -> int:
        """``L``: routing calls simulated."""
        return int(self.layer.shape[0])

    def summary(self, call: int) -> dict[str, Any]:
        """The load figures of one call, as :func:`moerouter.stats.summary` defines them.

        ``tokens_per_expert``, ``load_cv``, ``load_max_over_mean``, ``dropped_fraction``,
        ``real_experts_per_token`` and ``null_fraction``, from the routing itself (before the
        simulated capacity), as float64 Python numbers (the summary's are float32).
        """
        load = self.tokens_per_expert[call].astype(np.float64)
        mean = max(float(load.mean()), 1e-30)
        real_choices = self.choices[call] - self.null_choices[call]
        return {
            "tokens_per_expert": self.tokens_per_expert[call].copy(),
            "load_cv": float(load.std()) / mean,
            "load_max_over_mean": float(load.max()) / mean,
            "dropped_fraction": float(self.policy_dropped[call]) / max(float(real_choices), 1.0),
            "real_experts_per_token": float(self.real_rows[call])
            / max(float(self.tokens[call]), 1),
            "null_fraction": float(self.null_choices[call]) / max(float(self.choices[call]), 1.0),
        }

    def totals(self) -> dict[str, float]:
        """Figures over the whole run (per-call figures averaged over calls, times per step).

        - ``real_experts_per_token``: real rows over tokens.
        - ``expert_max_over_mean``, ``rank_max_over_mean``: busiest expert / rank over the mean,
          averaged over calls (after the simulated capacity).
        - ``dropped_fraction``: real choices dropped by the policy or the simulated capacity.
        - ``null_saved``: share of all choices that went to a null expert: the rows a plain
          top-k would have sent and null experts kept off the network.
        - ``local_share``, ``intra_node_share``, ``inter_node_share``: of the real rows.
        - ``locality_saved``: ``1 - inter_node_rows / baseline_inter_node_rows``, the inter-node
          rows avoided compared with destinations spread uniformly over the ranks (negative:
          worse than uniform).
        - ``step_time``: seconds of all all-to-alls of one step (every layer's control exchange,
          dispatch and combine), averaged over steps; ``layer_time``: the same per call.
        - ``max_rank_bytes``: the largest bytes one rank sends in dispatch per step.
        """
        calls = max(self.num_calls, 1)
        steps = max(len(np.unique(self.step)), 1)
        rank_load = self.rank_load.astype(np.float64)
        expert_load = self.expert_load.astype(np.float64)

        def ratio(load: np.ndarray) -> float:
            if load.size == 0:
                return 0.0
            mean = np.maximum(load.mean(axis=1), 1e-30)
            return float(np.mean(load.max(axis=1) / mean))

        real = float(self.real_rows.sum())
        real_choices = float((self.choices - self.null_choices).sum())
        dropped = float((self.policy_dropped + self.capacity_dropped).sum())
        baseline = float(self.baseline_inter_node_rows.sum())
        times = self.count_time + self.dispatch_time + self.combine_time
        return {
            "calls": float(self.num_calls),
            "real_experts_per_token": real / max(float(self.tokens.sum()), 1.0),
            "expert_max_over_mean": ratio(expert_load),
            "rank_max_over_mean": ratio(rank_load),
            "dropped_fraction": dropped / max(real_choices, 1.0),
            "null_saved": float(self.null_choices.sum()) / max(float(self.choices.sum()), 1.0),
            "local_share": float(self.local_rows.sum()) / max(real, 1.0),
            "intra_node_share": float(self.intra_node_rows.sum()) / max(real, 1.0),
            "inter_node_share": float(self.inter_node_rows.sum()) / max(real, 1.0),
            "locality_saved": (
                1.0 - float(self.inter_node_rows.sum()) / baseline if baseline > 0 else 0.0
            ),
            "step_time": float(times.sum()) / steps,
            "layer_time": float(times.sum()) / calls,
            "max_rank_bytes": float(self.dispatch_bytes.sum(axis=1).max(initial=0)) / steps,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every figure as JSON-serialisable Python values (matrices included)."""
        document: dict[str, Any] = {
            "topology": {
                key: getattr(self.topology, key) for key in self.topology.__dataclass_fields__
            },
            "placement": self.placement.tolist(),
            "row_bytes": self.row_bytes,
            "capacity": self.capacity,
            "names": list(self.names),
            "totals": self.totals(),
        }
        for key in (*_PER_LAYER_INT, *_PER_LAYER_FLOAT):
            document[key] = getattr(self, key).tolist()
        for key in ("tokens_per_expert", "expert_load", "rank_load"):
            document[key] = getattr(self, key).tolist()
        for key in ("dispatch_bytes", "count_bytes"):
            document[key] = getattr(self, key).tolist()
        return document


def run(
    layers: Any,
    *,
    topology: Topology,
    placement: str | Sequence[int] | np.ndarray = "contiguous",
    num_experts: int | None = None,
    hidden_size: int = 4096,
    bytes_per_element: int = 2,
    capacity: int | None = None,
    capacity_factor: float | None = None,
    token_ranks: Any = None,
    keep_matrices: bool = False,
) -> SimulationResult:
    """Simulate expert-parallel dispatch and combine of routed layers on a cluster.

    Each routing call (a layer at a step) is one exchange, exactly as
    ``moerouter_torch.distributed`` does it: a header all-gather and a counts all-to-all (every
    rank sends every rank one int64 count per expert that rank holds), then the rows
    all-to-all (dropless: the real rows only, as uneven splits; capacity mode: ``capacity``
    rows per expert from every rank, zero-padded, rows past it dropped), then the combine
    all-to-all, the dispatch transposed.

    Parameters
    ----------
    layers : Trace, Routing, TraceRecord, or an iterable of them or of int arrays (T, k)
        The routing calls. Arrays hold expert ids (-1: none) and need ``num_experts``.
    topology : Topology
    placement : str or array-like (E,) int
        See :func:`place_experts`.
    num_experts : int, optional
        ``E`` for expert-id arrays (routings carry their own).
    hidden_size, bytes_per_element : int
        A row is ``hidden_size * bytes_per_element`` bytes (4096 x 2: bfloat16 activations).
    capacity : int, optional
        Static-capacity mode: rows per expert each rank sends (``capacity=`` of
        ``moerouter_torch.distributed.dispatch``).
    capacity_factor : float, optional
        Static-capacity mode with ``capacity = ceil(cf * tokens_per_rank * k / E)``, from the
        largest rank's tokens and the assignments per token ``k`` (for the expert layout, their
        mean); per call; not with ``capacity``.
    token_ranks : array (T,) int, optional
        The rank each token starts on; ``W`` near-equal contiguous blocks by default (token
        ``t`` on rank ``t * W // T``), which is how each rank's own batch is laid end to end.
    keep_matrices : bool
        Keep each call's ``(W, W)`` dispatch byte matrix (``L * W * W`` int64s).

    Returns
    -------
    SimulationResult

    Examples
    --------
    >>> import numpy as np
    >>> from moerouter import simulate
    >>> expert_ids = np.array([[0, 1], [2, 3], [0, 2], [1, 3]])   # 4 tokens, k = 2
    >>> result = simulate.run([expert_ids], num_experts=4, hidden_size=1, bytes_per_element=1,
    ...                       topology=simulate.Topology(world_size=2, ranks_per_node=1))
    >>> result.dispatch_bytes.tolist()   # rank 0 holds experts 0-1 and its tokens 0 and 1
    [[2, 2], [2, 2]]
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a simulate.Topology, got {type(topology).__name__}")
    row_bytes = _check_int(hidden_size, "hidden_size") * _check_int(
        bytes_per_element, "bytes_per_element"
    )
    if capacity is not None and capacity_factor is not None:
        raise ValueError("give capacity or capacity_factor, not both")
    if capacity is not None:
        capacity = _check_int(capacity, "capacity")
    if capacity_factor is not None:
        _check_rate(capacity_factor, "capacity_factor", positive=True)
    ranks_of_tokens = None
    if token_ranks is not None:
        ranks_of_tokens = to_numpy(token_ranks).astype(np.int64)
        if ranks_of_tokens.size and (
            ranks_of_tokens.min() < 0 or ranks_of_tokens.max() >= topology.world_size
        ):
            raise ValueError(f"token_ranks must lie in [0, world_size = {topology.world_size})")
    world = topology.world_size

    rows_per_call: dict[str, list[Any]] = {key: [] for key in (*_PER_LAYER_INT, *_PER_LAYER_FLOAT)}
    tokens_per_expert, expert_load, rank_load, names, matrices = [], [], [], [], []
    ranks: _Ranks | None = None
    experts_seen = None
    total_rows = np.zeros((world, world), np.int64)
    used_capacity: int | None = capacity
    padded_links: dict[int, dict[str, np.ndarray]] = {}
    count_matrix = np.zeros((world, world), np.int64)
    count_time = 0.0
    calls = 0

    for decision in _decisions(layers, num_experts):
        if experts_seen is None:
            experts_seen = decision.num_experts
            if num_experts is not None and num_experts != experts_seen:
                raise ValueError(
                    f"num_experts = {num_experts} but the routing has {experts_seen} experts"
                )
            where = place_experts(placement, experts_seen, topology)
            ranks = _Ranks(topology, where)
            # Every call exchanges the same control bytes: the header all-gather, then one int64
            # count per expert the receiver holds.
            count_matrix = np.broadcast_to(
                HEADER_BYTES + COUNT_BYTES * ranks.experts_on[None, :], (world, world)
            )
            count_time = ranks.time(ranks.link_split(np.array(count_matrix)))
        elif decision.num_experts != experts_seen:
            raise ValueError(
                f"every layer must have the same number of experts: {experts_seen}, then "
                f"{decision.num_experts} (layer {decision.layer}, step {decision.step})"
            )
        assert ranks is not None
        counts, unrouted = _count_rows(decision, ranks_of_tokens, world)
        policy = _policy_figures(decision, int(unrouted.sum()))
        per_expert = counts.sum(axis=0)
        if capacity_factor is not None:
            if ranks_of_tokens is None:
                tokens_per_rank = -(-decision.num_tokens // world)
            else:
                tokens_per_rank = int(np.bincount(ranks_of_tokens, minlength=world).max())
            # Assignments per token: k, or on average E * C / S for the expert layout.
            if decision.token_ids is None:
                rows_per_rank = tokens_per_rank * decision.slots
            else:
                rows = decision.expert_ids.shape[0]
                rows_per_rank = -(-tokens_per_rank * rows // max(decision.num_tokens, 1))
            used_capacity = capacity_rows(
                capacity_factor, rows_per_rank, 1, decision.num_experts, 1
            )
        if used_capacity is not None:
            kept = np.minimum(counts, used_capacity)
            real = ranks.by_rank(kept)
            sent = np.broadcast_to(used_capacity * ranks.experts_on[None, :], real.shape)
            capacity_dropped = int(per_expert.sum() - kept.sum())
            processed = kept.sum(axis=0)
        else:
            real = ranks.by_rank(counts)
            sent = real
            capacity_dropped = 0
            processed = per_expert
        real_links = ranks.link_split(real)
        if used_capacity is None:
            sent_links = real_links
        else:  # the padded exchange depends only on the capacity: split it once
            if used_capacity not in padded_links:
                padded_links[used_capacity] = ranks.link_split(np.array(sent))
            sent_links = padded_links[used_capacity]
        rows_time = ranks.time(sent_links, row_bytes)
        total_rows += sent
        calls += 1
        if keep_matrices:
            matrices.append(sent * row_bytes)
        names.append(decision.name)
        tokens_per_expert.append(per_expert)
        expert_load.append(processed)
        rank_load.append(real_links["in"])
        values = {
            "layer": decision.layer,
            "step": decision.step,
            **policy,
            "real_rows": int(per_expert.sum()),
            "rows_sent": int(sent_links["out"].sum()),
            "capacity_dropped": capacity_dropped,
            "local_rows": int(real_links["self"].sum()),
            "intra_node_rows": int(real_links["out_intra"].sum()),
            "inter_node_rows": int(real_links["out_inter"].sum()),
            "baseline_inter_node_rows": float(real_links["out"] @ ranks.remote_share),
            "count_time": count_time,
            "dispatch_time": rows_time,
            # The cost model is symmetric in sending and receiving: the transpose costs the same.
            "combine_time": rows_time,
        }
        for key, value in values.items():
            rows_per_call[key].append(value)

    if experts_seen is None:
        raise ValueError("layers is empty: nothing to simulate")
    assert ranks is not None
    result = SimulationResult(
        topology=topology,
        placement=place_experts(placement, experts_seen, topology),
        row_bytes=row_bytes,
        capacity=used_capacity,
        names=names,
        tokens_per_expert=np.stack(tokens_per_expert).astype(np.int64),
        expert_load=np.stack(expert_load).astype(np.int64),
        rank_load=np.stack(rank_load).astype(np.int64),
        dispatch_bytes=total_rows * row_bytes,
        combine_bytes=np.ascontiguousarray(total_rows.T) * row_bytes,
        count_bytes=count_matrix * calls,
        layer_dispatch_bytes=np.stack(matrices) if keep_matrices else None,
    )
    for key in _PER_LAYER_INT:
        setattr(result, key, np.asarray(rows_per_call[key], dtype=np.int64))
    for key in _PER_LAYER_FLOAT:
        setattr(result, key, np.asarray(rows_per_call[key], dtype=np.float64))
    return result
