"""The cluster: :class:`Topology` (ranks, nodes, links and the cost model's constants) and
:func:`place_experts` (which rank holds which expert); the byte sizes of the control exchange.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moerouter._validation import check_int_at_least as _check_int

__all__ = ["COUNT_BYTES", "HEADER_BYTES", "Topology", "place_experts"]

#: Bytes per count in the counts exchange: ``moerouter_torch.distributed`` sends int64 counts.
COUNT_BYTES = 8


#: Bytes of the header every rank all-gathers before each dispatch (settings and a failure
#: flag, so that mismatched or failing ranks raise instead of hanging): 43 int64s.
HEADER_BYTES = 344


PLACEMENTS = ("contiguous", "round_robin", "node_grouped")


def _check_rate(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(
            f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}"
        )
    return number


@dataclass(frozen=True)
class Topology:
    """Ranks, nodes and links of the simulated cluster.

    Ranks ``n * ranks_per_node .. (n + 1) * ranks_per_node - 1`` form node ``n`` (the last node
    may be partial). Bandwidths are per rank and per direction, in bytes per second; each rank
    drives its intra-node link (NVLink) and its inter-node link (its NIC) at the same time.
    The defaults are nominal DGX H100 figures (NVLink 4: 450 GB/s per direction per GPU; one
    400 Gb/s NDR NIC per GPU: 50 GB/s), not measurements: set your own.

    Parameters
    ----------
    world_size : int
        Ranks (expert-parallel degree), ``>= 1``.
    ranks_per_node : int
        ``>= 1``.
    intra_node_bandwidth, inter_node_bandwidth : float
        Bytes per second per rank and direction, ``> 0``.
    intra_node_latency, inter_node_latency : float
        Seconds an all-to-all pays once when it uses that kind of link, ``>= 0``.
    """

    world_size: int
    ranks_per_node: int = 8
    intra_node_bandwidth: float = 450e9
    inter_node_bandwidth: float = 50e9
    intra_node_latency: float = 3e-6
    inter_node_latency: float = 10e-6

    def __post_init__(self) -> None:
        _check_int(self.world_size, "world_size")
        _check_int(self.ranks_per_node, "ranks_per_node")
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            _check_rate(getattr(self, name), name, positive=True)
        for name in ("intra_node_latency", "inter_node_latency"):
            _check_rate(getattr(self, name), name, positive=False)

    @property
    def num_nodes(self) -> int:
        """Nodes, the last possibly partial."""
        return -(-self.world_size // self.ranks_per_node)

    def node_of_rank(self) -> np.ndarray:
        """(W,) int64: the node of each rank."""
        return np.arange(self.world_size, dtype=np.int64) // self.ranks_per_node


def place_experts(
    kind: str | Sequence[int] | np.ndarray,
    num_experts: int,
    topology: Topology,
) -> np.ndarray:
    """The rank of every expert.

    Parameters
    ----------
    kind : str or array-like (E,) int
        - ``"contiguous"``: blocks of ``E / W`` experts, rank ``r`` holding experts
          ``r * E / W .. (r + 1) * E / W - 1`` (``moerouter_torch.distributed``'s layout; needs
          ``E`` a multiple of ``W``);
        - ``"round_robin"``: expert ``e`` on rank ``e mod W``;
        - ``"node_grouped"``: LocMoE's node grouping, the layout
          :class:`moerouter.LocalityTopK` assumes: ``N`` nodes hold contiguous blocks of
          ``E / N`` experts (``E`` a multiple of ``N``), spread round-robin over the node's
          ranks (node level equals ``"contiguous"`` when ``E`` is a multiple of ``W``);
        - a table: ``kind[e]`` is expert ``e``'s rank, in ``[0, W)``.
    num_experts : int
        ``E``.
    topology : Topology

    Returns
    -------
    ndarray (E,) int64

    Examples
    --------
    >>> from moerouter import simulate
    >>> topology = simulate.Topology(world_size=4, ranks_per_node=2)
    >>> simulate.place_experts("contiguous", 8, topology).tolist()
    [0, 0, 1, 1, 2, 2, 3, 3]
    >>> simulate.place_experts("node_grouped", 8, topology).tolist()
    [0, 1, 0, 1, 2, 3, 2, 3]
    """
    num_experts = _check_int(num_experts, "num_experts")
    world = topology.world_size
    experts = np.arange(num_experts, dtype=np.int64)
    if isinstance(kind, str):
        name = kind.replace("-", "_")
        if name == "contiguous":
            if num_experts % world:
                raise ValueError(
                    f"contiguous placement needs num_experts = {num_experts} to be a multiple "
                    f"of world_size = {world}"
                )
            return experts // (num_experts // world)
        if name == "round_robin":
            return experts % world
        if name == "node_grouped":
            nodes = topology.num_nodes
            if num_experts % nodes:
                raise ValueError(
                    f"node_grouped placement needs num_experts = {num_experts} to be a multiple "
                    f"of the {nodes} nodes"
                )
            node = experts // (num_experts // nodes)
            first = node * topology.ranks_per_node
            ranks_here = np.minimum(first + topology.ranks_per_node, world) - first
            return first + (experts % (num_experts // nodes)) % ranks_here
        raise ValueError(f"placement must be one of {PLACEMENTS} or a table, got {kind!r}")
    table = np.asarray(kind)
    if table.shape != (num_experts,) or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"a placement table must be ints of shape ({num_experts},)")
    if table.size and (table.min() < 0 or table.max() >= world):
        raise ValueError(f"placement table entries must lie in [0, world_size = {world})")
    return table.astype(np.int64)
