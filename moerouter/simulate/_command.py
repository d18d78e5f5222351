"""``python -m moerouter simulate``: route a workload or a trace, simulate it, report and plot.

Every combination of ``--policy`` and ``--workload`` (or the ``--trace``) is one run. Each rank
routes its own ``--tokens-per-rank`` tokens (the policy sees ``(world, tokens_per_rank, E')``
logits: one group per rank, as every rank routes its own micro-batch), for ``--layers`` layers
and ``--steps`` steps; a workload draws each (layer, step) with ``seed=(seed, layer, step)``
and keeps its structure (popular experts, tables) per layer with
``structure_seed=(seed, layer)``. Every policy sees the same real-expert logits; AdaMoE's
``M`` null columns are appended as Gumbel noise at the mean real popularity
``log(1 / E)`` (each null expert as likely as an average real one), standing for a router
that sends a steady share of its choices to null experts.

The table goes to stdout and ``results.txt``, every figure to ``results.json``, the byte
matrices to ``results.npz``; with matplotlib, ``traffic.png`` (the rank-to-rank dispatch bytes
per step) and ``load.png`` (the rows each rank receives).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import traces, workloads
from moerouter.simulate._model import PLACEMENTS, SimulationResult, Topology, place_experts, run

__all__ = ["add_arguments", "main"]

GIGA, MICRO = 1e9, 1e-6
ROUTE_RANKS_AT_ONCE = 16  # ranks routed per policy call: bounds the policy's working memory


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


# --------------------------------------------------------------------------------------------
# Policies


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


# --------------------------------------------------------------------------------------------
# Checking


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


# --------------------------------------------------------------------------------------------
# Running


def _routed_calls(
    args: argparse.Namespace, plan: _Plan, policy: _Policy, generator: Callable[..., Any]
) -> Iterator[traces.TraceRecord]:
    """Each (step, layer): the workload's logits, routed rank by rank, as one record."""
    world, per_rank = args.world, args.tokens_per_rank
    experts = plan.num_experts
    router = policy.make(experts, args.k, plan.topology)
    columns = experts + policy.num_null
    node_of_rank = plan.topology.node_of_rank()
    for step in range(args.steps):
        for layer in range(args.layers):
            logits = generator(
                world * per_rank,
                experts,
                seed=(args.seed, layer, step),
                structure_seed=(args.seed, layer),
            )
            if policy.num_null:
                # Null columns: Gumbel noise at the mean real popularity log(1 / E), so each
                # null expert is as likely as an average real one; the real columns are the
                # same as every other policy's.
                nulls = workloads.uniform(
                    world * per_rank, policy.num_null, seed=(args.seed, layer, step, 1)
                )
                nulls -= np.float32(np.log(experts))
                logits = np.concatenate([logits, nulls], axis=1)
            logits = logits.reshape(world, per_rank, columns)
            parts = []
            for first in range(0, world, ROUTE_RANKS_AT_ONCE):
                ranks = slice(first, min(first + ROUTE_RANKS_AT_ONCE, world))
                extra: tuple[Any, ...] = ()
                if policy.needs_nodes:
                    extra = (np.repeat(node_of_rank[ranks], per_rank),)
                routing = router(logits[ranks], *extra)
                parts.append(traces.TraceRecord.from_routing(routing, layer=layer, step=step))
            yield traces.concatenate(parts)


def _replayed_calls(
    args: argparse.Namespace, plan: _Plan, policy: _Policy | None
) -> Iterator[traces.TraceRecord | mr.Routing]:
    assert plan.trace is not None
    if policy is None:
        yield from plan.trace.records
        return
    router = policy.make(plan.num_experts, args.k, plan.topology)
    node_of_rank = plan.topology.node_of_rank()
    for record in plan.trace.records:
        extra: tuple[Any, ...] = ()
        if policy.needs_nodes:
            ranks = np.arange(record.num_tokens) * args.world // max(record.num_tokens, 1)
            extra = (node_of_rank[ranks],)
        yield record.route(router, *extra)


def _simulate(args: argparse.Namespace, plan: _Plan) -> list[dict[str, Any]]:
    runs = []
    for spec, generator in plan.workloads:
        for policy in plan.policies:
            started = time.perf_counter()
            if plan.trace is None:
                assert policy is not None
                calls: Any = _routed_calls(args, plan, policy, generator)
            else:
                calls = _replayed_calls(args, plan, policy)
            result = run(
                calls,
                topology=plan.topology,
                placement=plan.placement,
                hidden_size=args.hidden,
                bytes_per_element=args.bytes_per_element,
                capacity_factor=args.capacity_factor,
            )
            seconds = time.perf_counter() - started
            label = "recorded decisions" if policy is None else policy.label
            print(f"  {label} | {spec}: {seconds:.1f} s", file=sys.stderr, flush=True)
            runs.append(
                {
                    "policy": "recorded" if policy is None else policy.spec,
                    "label": "recorded decisions" if policy is None else policy.label,
                    "workload": spec,
                    "result": result,
                    "seconds": seconds,
                }
            )
    return runs


# --------------------------------------------------------------------------------------------
# Reporting

_COLUMNS = (
    ("policy", "", 22, None),
    ("workload", "", 18, None),
    ("real exp/tok", "", 12, "real_experts_per_token"),
    ("expert max/mean", "", 15, "expert_max_over_mean"),
    ("rank max/mean", "", 13, "rank_max_over_mean"),
    ("dropped", "%", 7, "dropped_fraction"),
    ("null saved", "%", 10, "null_saved"),
    ("inter-node", "% rows", 10, "inter_node_share"),
    ("locality saved", "%", 14, "locality_saved"),
    ("max rank out", "MB/step", 12, "max_rank_bytes"),
    ("all-to-all", "ms/step", 10, "step_time"),
)


def _cell(key: str | None, totals: dict[str, float]) -> str:
    assert key is not None
    value = totals[key]
    if key in ("dropped_fraction", "null_saved", "inter_node_share", "locality_saved"):
        return f"{100 * value:.1f}"
    if key == "max_rank_bytes":
        return f"{value / 1e6:.1f}"
    if key == "step_time":
        return f"{value * 1e3:.3f}"
    return f"{value:.2f}"


def table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run: the totals of :meth:`SimulationResult.totals`."""
    header = " ".join(f"{name:>{width}}" for name, _, width, _ in _COLUMNS)
    units = " ".join(f"{unit:>{width}}" for _, unit, width, _ in _COLUMNS)
    lines = [header, units, "-" * len(header)]
    for entry in runs:
        totals = entry["result"].totals()
        cells = [f"{entry['label']:>22}"[:22], f"{entry['workload']:>18}"[:18]]
        cells += [f"{_cell(key, totals):>{width}}" for _, _, width, key in _COLUMNS[2:]]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _settings(args: argparse.Namespace, plan: _Plan) -> dict[str, Any]:
    return {
        "world": args.world,
        "experts": plan.num_experts,
        "k": args.k,
        "tokens_per_rank": args.tokens_per_rank,
        "layers": args.layers,
        "steps": args.steps,
        "seed": args.seed,
        "placement": args.placement,
        "hidden": args.hidden,
        "bytes_per_element": args.bytes_per_element,
        "capacity_factor": args.capacity_factor,
        "topology": {
            key: getattr(plan.topology, key) for key in plan.topology.__dataclass_fields__
        },
    }


def _run_document(entry: dict[str, Any]) -> dict[str, Any]:
    result: SimulationResult = entry["result"]
    per_call = result.to_dict()
    for key in ("dispatch_bytes", "count_bytes", "placement", "topology"):
        per_call.pop(key)
    return {
        "policy": entry["policy"],
        "label": entry["label"],
        "workload": entry["workload"],
        "simulate_seconds": entry["seconds"],
        **per_call,
    }


HEATMAP_CELLS = 128  # at most this many cells a side: beyond, ranks are summed in blocks


def _blocks(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` summed over square blocks of ranks, at most ``HEATMAP_CELLS`` a side."""
    world = matrix.shape[0]
    block = -(-world // HEATMAP_CELLS)
    if block == 1:
        return matrix.astype(np.float64)
    cells = -(-world // block)
    padded = np.zeros((cells * block, cells * block))
    padded[:world, :world] = matrix
    return padded.reshape(cells, block, cells, block).sum(axis=(1, 3))  # type: ignore[no-any-return]


def plot(out: Path, runs: Sequence[dict[str, Any]], title: str) -> list[Path]:
    """``traffic.png`` and ``load.png``; nothing (an empty list) without matplotlib."""
    try:
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        return []
    columns = min(len(runs), 3)
    rows = -(-len(runs) // columns)
    figure = Figure(figsize=(4.2 * columns + 1, 3.9 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    steps = [max(len(np.unique(entry["result"].step)), 1) for entry in runs]
    matrices = [
        _blocks(entry["result"].dispatch_bytes) / count
        for entry, count in zip(runs, steps, strict=True)
    ]
    world = runs[0]["result"].dispatch_bytes.shape[0]
    block = -(-world // HEATMAP_CELLS)
    heading = f"dispatch bytes per step, rank to rank (log scale)\n{title}"
    if block > 1:
        heading += f"\ncells sum blocks of {block} x {block} ranks (full matrices: results.npz)"
    figure.suptitle(heading, fontsize=9)
    positive = [m[m > 0] for m in matrices]
    low = min((float(p.min()) for p in positive if p.size), default=1.0)
    high = max((float(p.max()) for p in positive if p.size), default=10.0)
    image = None
    for axis, entry, matrix in zip(axes, runs, matrices, strict=False):  # spare axes
        shown = np.where(matrix > 0, matrix, np.nan)
        image = axis.imshow(
            shown,
            cmap="viridis",
            norm=LogNorm(low, max(high, low * 10)),
            extent=(0, world, world, 0),  # axes in ranks, whatever the block size
            interpolation="nearest",
        )
        axis.set_title(f"{entry['label']} | {entry['workload']}", fontsize=8)
        axis.set_xlabel("to rank", fontsize=7)
        axis.set_ylabel("from rank", fontsize=7)
        axis.tick_params(labelsize=6)
    for axis in axes[len(runs) :]:
        axis.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=list(axes[: len(runs)]), shrink=0.8, label="bytes")
    traffic = out / "traffic.png"
    figure.savefig(traffic, dpi=80)

    # Load per rank, busiest first: each call's loads sorted, then averaged over the calls.
    workload_names = list(dict.fromkeys(entry["workload"] for entry in runs))
    policy_labels = list(dict.fromkeys(entry["label"] for entry in runs))
    figure = Figure(figsize=(4.4 * len(workload_names) + 1, 4.2), layout="constrained")
    figure.suptitle(f"load per rank, busiest first\n{title}", fontsize=9)
    panels = np.atleast_1d(figure.subplots(1, len(workload_names), sharey=True)).reshape(-1)
    colours = {label: f"C{index % 10}" for index, label in enumerate(policy_labels)}
    for axis, workload in zip(panels, workload_names, strict=True):
        for entry in runs:
            if entry["workload"] != workload:
                continue
            loads = np.sort(entry["result"].rank_load.astype(np.float64), axis=1)[:, ::-1]
            means = np.maximum(loads.mean(axis=1, keepdims=True), 1e-30)
            profile = (loads / means).mean(axis=0)
            axis.plot(
                np.arange(1, profile.shape[0] + 1),
                profile,
                lw=1.2,
                color=colours[entry["label"]],
                label=entry["label"],
            )
        axis.axhline(1.0, color="grey", lw=0.8, ls="--")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rank, busiest first", fontsize=8)
        axis.set_title(workload, fontsize=8)
        axis.grid(alpha=0.3, which="both")
        axis.tick_params(labelsize=7)
    panels[0].set_ylabel("rows received / mean", fontsize=8)
    panels[0].legend(fontsize=7)
    load_path = out / "load.png"
    figure.savefig(load_path, dpi=100)
    return [traffic, load_path]


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check (exit 2 naming the option), simulate every run, print and write the reports."""
    try:
        plan = check(args)
    except SimulateInputError as error:
        parser.error(str(error))
    top = plan.topology
    source = f"trace {args.trace}" if args.trace else f"{args.tokens_per_rank} tokens per rank"
    title = (
        f"{args.world} ranks ({top.num_nodes} nodes of {top.ranks_per_node}), "
        f"{plan.num_experts} experts, k={args.k}, {source}, {args.layers} layer(s) x "
        f"{args.steps} step(s), placement {args.placement}, rows of {args.hidden} x "
        f"{args.bytes_per_element} B"
        + (f", static capacity cf {args.capacity_factor:g}" if args.capacity_factor else "")
    )
    print(f"moerouter simulate: {title}", flush=True)
    runs = _simulate(args, plan)
    text = table(runs)
    print("\n" + text)
    out: Path = args.out
    command = shlex.join(["python", "-m", "moerouter", *getattr(args, "argv", ["simulate"])])
    document = {
        "command": command,
        "settings": _settings(args, plan),
        "runs": [_run_document(entry) for entry in runs],
    }
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(
        out / "results.npz",
        **{f"dispatch_bytes_{i}": entry["result"].dispatch_bytes for i, entry in enumerate(runs)},
    )
    (out / "results.txt").write_text(f"{command}\n{title}\n\n{text}\n", encoding="utf-8")
    written = [out / "results.txt", out / "results.json", out / "results.npz"]
    plots = plot(out, runs, title)
    print(
        f"\nWrote {', '.join(str(path) for path in written + plots)}"
        + ("" if plots else " (plots skipped: matplotlib is not installed)")
    )
    return 0
