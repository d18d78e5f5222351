"""The options of ``python -m moerouter simulate`` and their checks: :func:`add_arguments`
declares them, :func:`check` reads them into a plan (policies, workloads or a trace, topology,
placement, output folder) before any work, raising :class:`SimulateInputError` with the
option's name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import traces, workloads
from moerouter.simulate._topology import PLACEMENTS, Topology, place_experts

__all__ = ["add_arguments"]

GIGA, MICRO = 1e9, 1e-6


class SimulateInputError(ValueError):
    """Bad input found before any work; the message starts with the option's name."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive_float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a trace written by moerouter.traces (.npz)")
    source.add_argument(
        "--workload",
        nargs="+",
        metavar="SPEC",
        help="generators: uniform, zipf:EXPONENT, bursty:SWITCH, token_correlated:STRENGTH, "
        "hot_spikes:PROBABILITY, or name:key=value,... (moerouter.workloads)",
    )
    parser.add_argument(
        "--policy",
        nargs="+",
        metavar="SPEC",
        default=None,
        help="topk, topk:CAPACITY_FACTOR, adamoe:NUM_NULL, locmoe:MAX_NODES, "
        "expert_choice:CAPACITY_FACTOR (default: topk; with --trace: the recorded decisions)",
    )
    parser.add_argument("--world", type=_positive_int, default=256, help="ranks (default 256)")
    parser.add_argument("--experts", type=_positive_int, default=256, help="real experts E")
    parser.add_argument("--k", type=_positive_int, default=8, help="choices per token")
    parser.add_argument(
        "--tokens-per-rank", type=_positive_int, default=1024, help="tokens each rank routes"
    )
    parser.add_argument("--layers", type=_positive_int, default=1, help="MoE layers per step")
    parser.add_argument("--steps", type=_positive_int, default=1, help="steps")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (>= 0)")
    parser.add_argument(
        "--placement",
        default="contiguous",
        help=f"{', '.join(PLACEMENTS)} (or with dashes), or a .npy/.txt file of E ranks",
    )
    parser.add_argument("--ranks-per-node", type=_positive_int, default=8)
    parser.add_argument(
        "--intra-bandwidth", type=_positive_float, default=450.0, help="GB/s per rank, direction"
    )
    parser.add_argument(
        "--inter-bandwidth", type=_positive_float, default=50.0, help="GB/s per rank, direction"
    )
    parser.add_argument("--intra-latency", type=_non_negative_float, default=3.0, help="us")
    parser.add_argument("--inter-latency", type=_non_negative_float, default=10.0, help="us")
    parser.add_argument("--hidden", type=_positive_int, default=4096, help="features per row")
    parser.add_argument(
        "--bytes-per-element", type=_positive_int, default=2, help="2 for bfloat16 rows"
    )
    parser.add_argument(
        "--capacity-factor",
        type=_positive_float,
        default=None,
        help="simulate the static-capacity exchange, C = ceil(cf * tokens_per_rank * k / E) "
        "rows per expert from every rank (default: dropless)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("simulate-output"), help="output folder (created)"
    )


@dataclass(frozen=True)
class _Policy:
    spec: str
    label: str
    num_null: int
    make: Callable[[int, int, Topology], Any]  # (E, k, topology) -> policy
    needs_nodes: bool = False


def _parse_policy(spec: str) -> _Policy:
    name, _, value = spec.partition(":")
    name = name.strip().replace("-", "_")
    if name == "topk":
        if not value:
            return _Policy(spec, "top-k", 0, lambda e, k, _: mr.TopK(num_experts=e, k=k))
        factor = _positive_float(value)
        return _Policy(
            spec,
            f"top-k, cf {factor:g}",
            0,
            lambda e, k, _: mr.TopK(num_experts=e, k=k, capacity_factor=factor),
        )
    if name == "adamoe":
        nulls = _positive_int(value) if value else None
        if nulls is None:
            raise argparse.ArgumentTypeError("adamoe needs its null experts: adamoe:NUM_NULL")
        return _Policy(
            spec,
            f"AdaMoE +{nulls} null",
            nulls,
            lambda e, k, _: mr.NullExperts(num_experts=e, num_null=nulls, k=k),
        )
    if name == "locmoe":
        most = _positive_int(value) if value else 1
        return _Policy(
            spec,
            f"LocMoE, {most} node{'s' if most > 1 else ''}",
            0,
            lambda e, k, top: mr.LocalityTopK(
                num_experts=e, k=k, num_nodes=top.num_nodes, max_nodes=most
            ),
            needs_nodes=True,
        )
    if name == "expert_choice":
        factor = _positive_float(value) if value else 1.0
        return _Policy(
            spec,
            f"expert choice, cf {factor:g}",
            0,
            lambda e, k, _: mr.ExpertChoice(num_experts=e, capacity_factor=factor),
        )
    raise argparse.ArgumentTypeError(
        f"unknown policy {name!r}; choose from topk, adamoe, locmoe, expert_choice"
    )


@dataclass
class _Plan:
    topology: Topology
    policies: list[_Policy | None]  # None: the trace's recorded decisions
    workloads: list[tuple[str, Callable[..., Any]]]
    trace: traces.Trace | None
    num_experts: int
    placement: np.ndarray


def check(args: argparse.Namespace) -> _Plan:
    """Everything argparse cannot check, before any work.

    Raises
    ------
    SimulateInputError
        Naming the option at fault.
    """
    if args.seed < 0:
        raise SimulateInputError(f"--seed must be >= 0, got {args.seed}")
    policies: list[_Policy | None] = []
    for spec in args.policy or ([] if args.trace else ["topk"]):
        try:
            policies.append(_parse_policy(spec))
        except argparse.ArgumentTypeError as error:
            raise SimulateInputError(f"--policy {spec!r}: {error}") from None
    topology = Topology(
        world_size=args.world,
        ranks_per_node=args.ranks_per_node,
        intra_node_bandwidth=args.intra_bandwidth * GIGA,
        inter_node_bandwidth=args.inter_bandwidth * GIGA,
        intra_node_latency=args.intra_latency * MICRO,
        inter_node_latency=args.inter_latency * MICRO,
    )
    generators: list[tuple[str, Callable[..., Any]]] = []
    trace = None
    num_experts = args.experts
    if args.trace is not None:
        try:
            trace = traces.load(args.trace)
        except (OSError, ValueError, KeyError) as error:
            raise SimulateInputError(f"--trace {str(args.trace)!r}: {error}") from None
        if not trace.records:
            raise SimulateInputError(f"--trace {str(args.trace)!r} holds no records")
        num_experts = trace.records[0].num_experts
        if policies and any(record.logits is None for record in trace.records):
            raise SimulateInputError(
                f"--policy needs the trace's logits, and {str(args.trace)!r} has none "
                "(record with traces.record(logits=True)); omit --policy to simulate the "
                "recorded decisions"
            )
        if not policies:
            policies = [None]
        generators = [(str(args.trace), lambda: None)]
    else:
        for spec in args.workload:
            try:
                generators.append((spec, workloads.from_spec(spec)))
            except (TypeError, ValueError) as error:
                raise SimulateInputError(f"--workload {spec!r}: {error}") from None
    for policy in policies:
        if policy is None:
            continue
        try:
            policy.make(num_experts, args.k, topology)
        except (TypeError, ValueError) as error:
            raise SimulateInputError(f"--policy {policy.spec!r}: {error}") from None
    placement_kind: Any = args.placement
    if Path(args.placement).suffix in (".npy", ".txt"):
        try:
            path = Path(args.placement)
            placement_kind = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, int)
        except (OSError, ValueError) as error:
            raise SimulateInputError(f"--placement {args.placement!r}: {error}") from None
    try:
        placement = place_experts(placement_kind, num_experts, topology)
    except (TypeError, ValueError) as error:
        raise SimulateInputError(f"--placement {args.placement!r}: {error}") from None
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise SimulateInputError(f"--out {str(out)!r} is not a writable folder: {error}") from None
    return _Plan(topology, policies, generators, trace, num_experts, placement)
