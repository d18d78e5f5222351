"""What the demo shows: a progress bar, the results table, the JSON of every figure, the plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ProgressBar", "causal_lines", "plot", "table", "verdict", "write_json"]

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


def _pm(value: dict[str, float] | None, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value['mean']:+.{digits}f} ± {value['se']:.{digits}f}"


def table(runs: dict[str, dict[str, Any]], baseline: str) -> str:
    """The results table: one row per run, losses with their standard errors."""
    header = (
        f"{'run':<26} {'val loss ± SE':>17} {'vs top-2 (paired)':>19} {'real exp/tok':>12} "
        f"{'expert FLOPs':>12} {'vs top-1/top-2 line':>21} {'tokens/s':>9}"
    )
    units = f"{'':<26} {'(nats/byte)':>17} {'':>19} {'':>12} {'(top-2 = 1)':>12}"
    rows = [header, units, "-" * len(header)]
    for name, run in runs.items():
        loss = f"{run['validation_loss']:.4f} ± {run['validation_loss_se']:.4f}"
        versus_top2 = "(baseline)" if name == baseline else _pm(run["difference_vs_top2"])
        versus = run.get("vs_line")
        if run["defines_line"]:
            line = "(defines the line)"
        elif versus is None:
            line = ""
        else:
            line = _pm(versus) + ("*" if not 1.0 <= run["real_experts_per_token"] <= 2.0 else "")
        rows.append(
            f"{run['label']:<26} {loss:>17} {versus_top2:>19} "
            f"{run['real_experts_per_token']:>12.3f} {run['expert_flops_vs_top2']:>12.3f} "
            f"{line:>21} {run['tokens_per_second']:>9.0f}"
        )
    return "\n".join(rows)


def causal_lines(runs: dict[str, dict[str, Any]]) -> str:
    """For each causal expert-choice run, how its causal decision compares with batch expert
    choice on the validation windows, and each expert's realised capacity (empty: none ran)."""
    lines = []
    for run in runs.values():
        causal = run.get("causal")
        if causal is None:
            continue
        spans = ", ".join(
            f"layer {index} {min(layer):.2f}-{max(layer):.2f}"
            for index, layer in enumerate(causal["realised_capacity_vs_c"], 1)
        )
        lines.append(
            f"{run['label']}: the causal decision agrees with batch expert choice (C = "
            f"{causal['capacity']:.0f} per group of the training batch's size) on "
            f"{causal['agreement']:.1%} of token-expert cells; it makes {causal['recall']:.1%} of "
            f"batch expert choice's assignments, and {causal['precision']:.1%} of its own are "
            f"batch expert choice's. Realised capacity per expert / C: {spans}."
        )
    return "\n".join(lines)


def verdict(runs: dict[str, dict[str, Any]], baseline: str) -> str:
    """One sentence per run against the baseline: FLOPs saved, loss paid, with its uncertainty."""
    sentences = []
    for name, run in runs.items():
        if name == baseline:
            continue
        change = run["difference_vs_top2"]
        saved = 1.0 - run["expert_flops_vs_top2"]
        flops = (
            f"saves {saved:.0%} of top-2's expert FLOPs"
            if saved >= 0
            else (f"spends {-saved:.0%} more expert FLOPs than top-2")
        )
        ratio = change["mean"] / change["se"] if change["se"] > 0 else math.inf
        if abs(ratio) < 2:
            cost = f"and its loss is within noise of top-2's ({_pm(change)}, {abs(ratio):.1f} SE)"
        elif change["mean"] > 0:
            cost = f"and pays {_pm(change)[1:]} nats/byte ({ratio:.1f} SE)"
        else:
            cost = (
                f"and gains {-change['mean']:.4f} ± {change['se']:.4f} nats/byte ({-ratio:.1f} SE)"
            )
        line = run.get("vs_line")
        where = ""
        if line is not None and not run["defines_line"]:
            distance = abs(line["mean"] / line["se"]) if line["se"] > 0 else math.inf
            side = "below" if line["mean"] < 0 else "above"
            extrapolated = "" if 1 <= run["real_experts_per_token"] <= 2 else ", extrapolated"
            where = (
                f"; it lies {abs(line['mean']):.4f} ± {line['se']:.4f} {side} the top-1/top-2 "
                f"line ({distance:.1f} SE{extrapolated})"
            )
        sentences.append(f"{run['label']} {flops} {cost}{where}.")
    return " ".join(sentences)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Every figure, indented, keys in a stable order."""
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def plot(path: Path, runs: dict[str, dict[str, Any]], title: str) -> bool:
    """Loss against real experts per token, with standard errors and the top-1/top-2 line; and
    the paired difference to top-2, whose error bars are what separates the runs.

    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    loss_axes, difference_axes = figure.subplots(1, 2)
    figure.suptitle(title, fontsize=10)
    xs = [run["real_experts_per_token"] for run in runs.values()]
    low, high = min([1.0, *xs]) - 0.1, max([2.0, *xs]) + 0.1
    for axes, value, error in (
        (loss_axes, "validation_loss", "validation_loss_se"),
        (difference_axes, "difference_vs_top2", None),
    ):
        ends = {}
        for name, run in runs.items():
            y = run[value] if error else run[value]["mean"]
            y_error = run[error] if error else run[value]["se"]
            marker = "o" if run["defines_line"] else "s"
            axes.errorbar(
                run["real_experts_per_token"],
                y,
                yerr=y_error,
                fmt=marker,
                markersize=7,
                capsize=4,
                label=run["label"],
            )
            axes.annotate(
                run["label"].split(",")[0],
                (run["real_experts_per_token"], y),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=7,
            )
            if run["defines_line"]:
                ends[name] = (run["real_experts_per_token"], y)
        if len(ends) == 2:
            (x1, y1), (x2, y2) = sorted(ends.values())
            slope = (y2 - y1) / (x2 - x1)
            axes.plot(
                [low, high],
                [y1 + slope * (low - x1), y1 + slope * (high - x1)],
                "--",
                color="grey",
                label="top-1 / top-2 line",
            )
        axes.set_xlabel("real experts per token (expert FLOPs, top-2 = 2)")
        axes.grid(alpha=0.3)
    loss_axes.set_ylabel("validation loss (nats / byte), ± SE over windows")
    loss_axes.set_title("lower left is better", fontsize=9)
    loss_axes.legend(fontsize=8)
    difference_axes.axhline(0.0, color="black", linewidth=0.8)
    difference_axes.set_ylabel("loss minus top-2's, same windows (paired), ± SE")
    difference_axes.set_title(
        "paired difference to top-2: the noise of the windows cancels", fontsize=9
    )
    figure.savefig(path, dpi=110)
    return True
