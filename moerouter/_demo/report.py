"""What the demo shows: a progress bar, the results table, the JSON of every figure, the plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ProgressBar", "line_between", "plot", "table", "write_json"]

TIMING_FIELDS = ("train_seconds", "tokens_per_second")  # machine-dependent: not seed-reproducible


class ProgressBar:
    """``label [#######.....]  120/300  loss 2.345  19.6k tok/s  eta 0:35`` on one line.

    Redrawn in place on a terminal; elsewhere (logs, CI) a line at every tenth of the run.
    """

    def __init__(
        self, label: str, total: int, tokens_per_step: int, stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total = total
        self.tokens_per_step = tokens_per_step
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty()
        self.started = time.perf_counter()
        self.last_tenth = -1
        self.width = 0  # of the longest line drawn: a shorter one is padded over it

    def update(self, step: int, loss: float) -> None:
        """Show that ``step`` of ``total`` steps is done, with its training loss."""
        tenth = 10 * step // self.total
        if not self.interactive and tenth == self.last_tenth and step != self.total:
            return
        self.last_tenth = tenth
        elapsed = time.perf_counter() - self.started
        rate = step * self.tokens_per_step / max(elapsed, 1e-9)
        remaining = elapsed / step * (self.total - step)  # the first step includes warm-up
        filled = 24 * step // self.total
        line = (
            f"{self.label:<24} [{'#' * filled}{'.' * (24 - filled)}] {step:>{len(str(self.total))}}"
            f"/{self.total}  loss {loss:6.3f}  {rate / 1e3:6.1f}k tok/s  "
            + (f"eta {int(remaining) // 60}:{int(remaining) % 60:02d}" if step > 1 else "")
        )
        self.width = max(self.width, len(line))
        line = line.ljust(self.width) if self.interactive else line
        end = "\n" if step == self.total or not self.interactive else ""
        self.stream.write(("\r" if self.interactive else "") + line + end)
        self.stream.flush()


def line_between(runs: dict[str, dict[str, Any]], experts_per_token: float) -> float | None:
    """Validation loss on the straight line through the top-1 and top-2 points, at that x."""
    if "top1" not in runs or "top2" not in runs:
        return None
    one, two = runs["top1"], runs["top2"]
    slope = (two["validation_loss"] - one["validation_loss"]) / (
        two["real_experts_per_token"] - one["real_experts_per_token"]
    )
    return float(
        one["validation_loss"] + slope * (experts_per_token - one["real_experts_per_token"])
    )


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The results table: one row per policy."""
    header = (
        f"{'policy':<26} {'val loss':>8} {'bits/byte':>9} {'real experts/tok':>16} "
        f"{'expert FLOPs':>12} {'tokens/s':>9}  {'vs top-1/top-2 line':>19}"
    )
    units = f"{'':<26} {'(nats)':>8} {'':>9} {'':>16} {'(top-2 = 1)':>12}"
    rows = [header, units, "-" * len(header)]
    for run in runs.values():
        line = run.get("line_loss")
        if line is None:
            versus = ""
        elif run["router"].startswith("TopK"):
            versus = "(defines the line)"
        else:
            versus = f"{run['validation_loss'] - line:+.4f}"
        if versus.startswith(("+", "-")) and not 1.0 <= run["real_experts_per_token"] <= 2.0:
            versus += " (extrapolated)"
        rows.append(
            f"{run['label']:<26} {run['validation_loss']:>8.4f} "
            f"{run['validation_loss'] / 0.6931471805599453:>9.3f} "
            f"{run['real_experts_per_token']:>16.3f} {run['expert_flops_vs_top2']:>12.3f} "
            f"{run['tokens_per_second']:>9.0f}  {versus:>19}"
        )
    return "\n".join(rows)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Every figure, indented, keys in a stable order."""
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def plot(path: Path, runs: dict[str, dict[str, Any]], title: str) -> bool:
    """Loss against real experts per token (with the top-1/top-2 line), and the expert loads.

    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    loss_axes, load_axes = figure.subplots(1, 2, width_ratios=[1, 1.15])
    figure.suptitle(title, fontsize=10)

    xs = [run["real_experts_per_token"] for run in runs.values()]
    if "top1" in runs and "top2" in runs:
        low, high = min([1.0, *xs]) - 0.1, max([2.0, *xs]) + 0.1
        line = [line_between(runs, low), line_between(runs, high)]
        loss_axes.plot([low, high], line, "--", color="grey", label="top-1 / top-2 line")
    for name, run in runs.items():
        marker = "o" if name.startswith("top") else "s"
        loss_axes.plot(
            run["real_experts_per_token"],
            run["validation_loss"],
            marker,
            markersize=8,
            label=run["label"],
        )
        loss_axes.annotate(
            run["label"].split(",")[0],
            (run["real_experts_per_token"], run["validation_loss"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=7,
        )
    loss_axes.set_xlabel("real experts per token (expert FLOPs, top-2 = 2)")
    loss_axes.set_ylabel("validation loss (nats / byte)")
    loss_axes.set_title("lower left is better", fontsize=9)
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(fontsize=8)

    rows = [
        (f"{run['label']}  L{index + 1}", layer["expert_load"])
        for run in runs.values()
        for index, layer in enumerate(run["layers"])
    ]
    loads = [load for _, load in rows]
    image = load_axes.imshow(loads, aspect="auto", cmap="viridis", vmin=0.0)
    for row, load in enumerate(loads):
        for column, value in enumerate(load):
            load_axes.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if value < 0.6 * max(max(loads)) else "black",
            )
    load_axes.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    load_axes.set_xticks(range(len(loads[0])))
    load_axes.set_xlabel("real expert")
    load_axes.set_title(
        "share of validation tokens reaching each expert (row sum = real experts per token)",
        fontsize=9,
    )
    for boundary in range(1, len(runs)):  # separate the policies, whose layers sit together
        layers_each = len(rows) // len(runs)
        load_axes.axhline(boundary * layers_each - 0.5, color="white", linewidth=2)
    figure.colorbar(image, ax=load_axes, shrink=0.8)
    figure.savefig(path, dpi=110)
    return True
