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
from pathlib import Path
from typing import Any

import numpy as np

import moerouter as mr
from moerouter import traces, workloads
from moerouter.simulate._arguments import SimulateInputError, _Plan, _Policy, add_arguments, check
from moerouter.simulate._model import SimulationResult, run

__all__ = ["add_arguments", "main"]

ROUTE_RANKS_AT_ONCE = 16  # ranks routed per policy call: bounds the policy's working memory


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
