"""Losses over the fixed validation windows: means, standard errors, paired differences.

Every run is measured on the same windows, so two runs are compared window by window (a paired
difference): the windows' own difficulty, which dominates a single run's standard error, cancels.
With several seeds a window's loss is first averaged over the seeds; the standard errors then
measure the uncertainty of the validation sample, not the spread between trainings, which the
per-seed figures in ``results.json`` show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["Estimate", "difference", "estimate", "line_weights", "seed_average", "versus_line"]


class Estimate(dict[str, float]):
    """``{"mean": ..., "se": ...}``: JSON-ready, and ``mean``/``se`` as attributes."""

    @property
    def mean(self) -> float:
        return self["mean"]

    @property
    def se(self) -> float:
        return self["se"]


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and its standard error ``s / sqrt(n)`` (``s`` the sample standard deviation).

    Raises
    ------
    ValueError
        With fewer than two values (no standard error).
    """
    count = len(values)
    if count < 2:
        raise ValueError(f"a standard error needs at least 2 windows, got {count}")
    mean = math.fsum(values) / count
    variance = math.fsum((value - mean) ** 2 for value in values) / (count - 1)
    return Estimate(mean=mean, se=math.sqrt(variance / count))


def difference(losses: Sequence[float], baseline: Sequence[float], weight: float = 1.0) -> Estimate:
    """Paired ``losses - weight * baseline`` over the same windows: mean and standard error."""
    if len(losses) != len(baseline):
        raise ValueError(
            f"paired runs need the same windows, got {len(losses)} and {len(baseline)}"
        )
    return estimate([loss - weight * base for loss, base in zip(losses, baseline, strict=True)])


def line_weights(experts_per_token: float) -> tuple[float, float]:
    """``(a, b)`` with ``a * top1 + b * top2`` the straight line through top-1 (at 1 real expert
    per token) and top-2 (at 2) evaluated at ``experts_per_token`` (outside [1, 2]: extrapolated).
    """
    return 2.0 - experts_per_token, experts_per_token - 1.0


def versus_line(
    losses: Sequence[float],
    top1: Sequence[float],
    top2: Sequence[float],
    experts_per_token: float,
) -> Estimate:
    """Paired distance of ``losses`` to the top-1/top-2 line at ``experts_per_token``, per window
    (negative: below the line, better than mixing top-1 and top-2 for the same expert FLOPs)."""
    a, b = line_weights(experts_per_token)
    line = [a * one + b * two for one, two in zip(top1, top2, strict=True)]
    return difference(losses, line)


def seed_average(per_seed: Mapping[int, Sequence[float]]) -> list[float]:
    """Each window's loss averaged over the seeds (every seed measured on the same windows)."""
    columns = list(per_seed.values())
    if not columns or len({len(column) for column in columns}) != 1:
        raise ValueError("every seed must be measured on the same windows")
    return [math.fsum(window) / len(columns) for window in zip(*columns, strict=True)]
