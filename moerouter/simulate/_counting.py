"""Counting, vectorised per layer: what the simulator reads of a routing (expert ids, token
ranks, null and dropped choices), the rows each rank sends to each expert (one ``bincount``),
and per rank the rows, bytes and all-to-all times of a call under the cost model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import is_array_api_obj

from moerouter.routing import Routing
from moerouter.simulate._topology import Topology
from moerouter.traces import Trace, TraceRecord, to_numpy

__all__ = []


@dataclass(frozen=True)
class _Decision:
    """What the simulator reads of one routing: host arrays, token layout token-major."""

    expert_ids: np.ndarray  # (R,)
    token_ids: np.ndarray | None  # (R,); None: token layout, row r is token r // slots
    choice_ids: np.ndarray | None
    finite_rows: np.ndarray | None
    num_tokens: int
    num_experts: int
    num_choices: int  # E': real plus null columns
    slots: int
    layer: int
    step: int
    name: str


def _decision(item: Any, index: int, num_experts: int | None) -> _Decision:
    if isinstance(item, TraceRecord | Routing):
        token_layout = item.layout == "token"
        host = item if isinstance(item, TraceRecord) else None
        return _Decision(
            expert_ids=to_numpy(item.expert_ids),
            token_ids=None if token_layout else to_numpy(item.token_ids),
            choice_ids=to_numpy(item.choice_ids),
            finite_rows=to_numpy(item.finite_rows),
            num_tokens=item.num_tokens,
            num_experts=item.num_experts,
            num_choices=item.num_choices,
            slots=item.slots,
            layer=host.layer if host is not None else index,
            step=host.step if host is not None else 0,
            name=host.name if host is not None else "",
        )
    if isinstance(item, np.ndarray) or is_array_api_obj(item):
        ids = to_numpy(item)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"an expert-id array must be integers of shape (tokens, slots), got "
                f"{ids.dtype} {ids.shape}"
            )
        if num_experts is None:
            raise ValueError("num_experts is needed when the layers are expert-id arrays")
        if ids.size and (ids.min() < -1 or ids.max() >= num_experts):
            raise ValueError(f"expert ids must lie in [-1, num_experts = {num_experts})")
        return _Decision(
            expert_ids=ids.reshape(-1),
            token_ids=None,
            choice_ids=None,
            finite_rows=None,
            num_tokens=ids.shape[0],
            num_experts=num_experts,
            num_choices=num_experts,
            slots=ids.shape[1],
            layer=index,
            step=0,
            name="",
        )
    raise TypeError(
        "each layer must be a moerouter.Routing, a traces.TraceRecord or an int array of "
        f"expert ids (tokens, slots); got {type(item).__name__}"
    )


def _decisions(layers: Any, num_experts: int | None) -> Iterator[_Decision]:
    if isinstance(layers, Trace):
        layers = layers.records
    elif isinstance(layers, Routing | TraceRecord) or (
        isinstance(layers, np.ndarray) and layers.ndim == 2
    ):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a Trace or an iterable of routings, got {layers!r}")
    for index, item in enumerate(layers):
        yield _decision(item, index, num_experts)


def _source_ranks(token_ranks: np.ndarray | None, num_tokens: int, world: int) -> np.ndarray:
    """(T,) the rank each token starts on: given, or ``W`` near-equal contiguous blocks."""
    if token_ranks is None:
        return np.arange(num_tokens, dtype=np.int64) * world // max(num_tokens, 1)
    if token_ranks.shape != (num_tokens,):
        raise ValueError(f"token_ranks must have shape ({num_tokens},), got {token_ranks.shape}")
    return token_ranks


_CACHED_BINS = 1 << 14  # int64 bins per bincount call: 128 KiB, within a core's L2


def _count_rows(
    decision: _Decision, token_ranks: np.ndarray | None, world: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows per (source rank, expert), (W, E) int64, and rows to no expert per rank, (W,)."""
    experts = decision.num_experts
    ids = decision.expert_ids
    tokens = decision.num_tokens
    # Key (source rank, expert + 1): expert -1 (no expert) lands in column 0.
    offsets = np.arange(world, dtype=np.int64) * (experts + 1) + 1
    if decision.token_ids is None and token_ranks is None and tokens % world == 0:
        # Equal contiguous blocks in the token layout: rank r owns a contiguous run of rows.
        # Counting a few ranks at a time keeps the bins in cache (3-5x faster at W = 1024).
        by_rank = ids.reshape(world, -1)
        chunk = max(1, _CACHED_BINS // (experts + 1))
        counts = np.empty((world, experts + 1), dtype=np.int64)
        for first in range(0, world, chunk):
            last = min(first + chunk, world)
            keys = by_rank[first:last] + offsets[: last - first, None]
            counts[first:last] = np.bincount(
                keys.reshape(-1), minlength=(last - first) * (experts + 1)
            ).reshape(last - first, experts + 1)
    else:
        sources = _source_ranks(token_ranks, tokens, world)
        token_of_row = (
            np.repeat(np.arange(tokens), decision.slots)
            if decision.token_ids is None
            else decision.token_ids
        )
        keys = ids + offsets[sources[token_of_row]]
        counts = np.bincount(keys, minlength=world * (experts + 1)).reshape(world, experts + 1)
    return counts[:, 1:], counts[:, 0]


def _policy_figures(decision: _Decision, unrouted: int) -> dict[str, int]:
    """Tokens, choices, null choices and policy drops, counted as stats.summary counts them."""
    tokens, rows = decision.num_tokens, decision.expert_ids.shape[0]
    finite = decision.finite_rows
    if decision.choice_ids is None:  # bare expert ids: every row is a choice, -1 a drop
        return {"tokens": tokens, "choices": rows, "null_choices": 0, "policy_dropped": unrouted}
    if decision.num_choices == decision.num_experts and (finite is None or bool(finite.all())):
        # No null columns, every row finite: every row with no expert is a policy drop.
        return {"tokens": tokens, "choices": rows, "null_choices": 0, "policy_dropped": unrouted}
    is_null = decision.choice_ids >= decision.num_experts
    if finite is None or bool(finite.all()):
        null = int(np.count_nonzero(is_null))
        # Every row with no expert is a null choice or a dropped real choice.
        return {
            "tokens": tokens,
            "choices": rows,
            "null_choices": null,
            "policy_dropped": unrouted - null,
        }
    token_of_row = (
        np.repeat(np.arange(tokens), decision.slots)
        if decision.token_ids is None
        else decision.token_ids
    )
    chose = finite[token_of_row]
    return {
        "tokens": int(np.count_nonzero(finite)),
        "choices": int(np.count_nonzero(chose)),
        "null_choices": int(np.count_nonzero(chose & is_null)),
        "policy_dropped": int(np.count_nonzero(chose & ~is_null & (decision.expert_ids < 0))),
    }


class _Ranks:
    """Placement and topology facts reused by every layer."""

    def __init__(self, topology: Topology, placement: np.ndarray) -> None:
        world = topology.world_size
        self.topology = topology
        self.order = np.argsort(placement, kind="stable")
        self.sorted = bool(np.all(placement[:-1] <= placement[1:]))
        self.experts_on = np.bincount(placement, minlength=world)  # (W,)
        self.equal_blocks = self.sorted and bool(np.all(self.experts_on == self.experts_on[0]))
        self.bounds = np.concatenate([[0], np.cumsum(self.experts_on)])
        self.node = topology.node_of_rank()
        self.node_starts = np.arange(0, world, topology.ranks_per_node)
        node_sizes = np.bincount(self.node)
        # Share of rank pairs (s, r) that cross nodes, per source: the uniform-spread baseline.
        self.remote_share = (world - node_sizes[self.node]) / world

    def by_rank(self, per_expert: np.ndarray) -> np.ndarray:
        """(W, W): sum (W, E) columns into the rank that holds each expert."""
        world = self.topology.world_size
        if self.equal_blocks:
            if per_expert.shape[1] == world:  # one expert per rank: already by rank
                return per_expert
            return per_expert.reshape(world, world, -1).sum(axis=2)  # type: ignore[no-any-return]
        columns = per_expert if self.sorted else per_expert[:, self.order]
        starts = np.minimum(self.bounds[:-1], columns.shape[1] - 1)
        summed = np.add.reduceat(columns, starts, axis=1)
        summed[:, self.experts_on == 0] = 0  # reduceat gives a lone column for empty ranks
        return summed

    def link_split(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Per rank: rows out and in over intra- and inter-node links (self traffic is local)."""
        node, size = self.node, self.topology.ranks_per_node
        world = matrix.shape[0]
        ranks = np.arange(world)
        diagonal = matrix[ranks, ranks]
        if world % size == 0:
            out_by_node = matrix.reshape(world, -1, size).sum(axis=2)  # (W, N)
            in_by_node = matrix.reshape(-1, size, world).sum(axis=1)  # (N, W)
        else:
            out_by_node = np.add.reduceat(matrix, self.node_starts, axis=1)
            in_by_node = np.add.reduceat(matrix, self.node_starts, axis=0)
        out_own, in_own = out_by_node[ranks, node], in_by_node[node, ranks]
        out_all, in_all = out_by_node.sum(axis=1), in_by_node.sum(axis=0)
        return {
            "self": diagonal,
            "out": out_all,
            "in": in_all,
            "out_intra": out_own - diagonal,
            "in_intra": in_own - diagonal,
            "out_inter": out_all - out_own,
            "in_inter": in_all - in_own,
        }

    def time(self, links: dict[str, np.ndarray], scale: int = 1) -> float:
        """All-to-all seconds under the documented cost model (see the package docstring).

        ``links`` counts units of ``scale`` bytes (rows of ``row_bytes``, say).
        """
        top = self.topology
        intra = np.maximum(links["out_intra"], links["in_intra"]) * (
            scale / top.intra_node_bandwidth
        )
        inter = np.maximum(links["out_inter"], links["in_inter"]) * (
            scale / top.inter_node_bandwidth
        )
        seconds = float(np.max(np.maximum(intra, inter))) if intra.size else 0.0
        if np.any(links["out_inter"]):
            seconds += top.inter_node_latency
        elif np.any(links["out_intra"]):
            seconds += top.intra_node_latency
        return seconds
