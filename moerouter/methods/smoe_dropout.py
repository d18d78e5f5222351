"""SMoE-Dropout's training schedule: a growing number of experts (Chen et al., ICLR 2023).

The frozen random router it trains with is a gate: :class:`moerouter.gates.FrozenRandomRouter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal, get_args

from moerouter._validation import check_choice, check_int, check_positive_int

__all__ = ["K_SCHEDULES", "evaluate_at_k", "k_schedule"]


KSchedule = Literal[
    "linear_increase",
    "linear_decrease",
    "cosine_increase",
    "cosine_decrease",
    "exp_increase",
    "exp_decrease",
    "multi_step_increase",
    "multi_step_decrease",
]
#: Every ``mode`` of :func:`k_schedule`.
K_SCHEDULES: tuple[str, ...] = get_args(KSchedule)


def k_schedule(
    step: int,
    *,
    mode: KSchedule,
    k_min: int,
    k_max: int,
    total_steps: int,
    milestones: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> int:
    r"""SMoE-Dropout's number of active experts at training step ``t``: a pure function of ``t``.

    With :math:`\Delta = k_{\max} - k_{\min}`, :math:`T` = ``total_steps`` and
    :math:`\mathrm{round}` Python's (half to even), as in the official
    ``new_utils.py::calculate_gate_number``:

    - ``linear_increase``: :math:`k_{\min} + \mathrm{round}(\Delta\, t / T)`
    - ``linear_decrease``: :math:`k_{\max} + \mathrm{round}(-\Delta\, t / T)`
    - ``cosine_increase``: :math:`k_{\max} + \mathrm{round}(-\Delta \cos(\pi t / 2T))`
    - ``cosine_decrease``: :math:`k_{\min} + \mathrm{round}(\Delta \cos(\pi t / 2T))`
    - ``exp_increase``: :math:`k_{\max} + \mathrm{round}(-\Delta \cdot 0.99^{n(t)})`,
      :math:`n(t) = \lfloor t / \lfloor T/300 \rfloor \rfloor`
    - ``exp_decrease``: :math:`k_{\min} + \mathrm{round}(\Delta \cdot 0.99^{n(t)})`
    - ``multi_step_increase``: ``milestones[floor(n t / T)]`` for n milestones
    - ``multi_step_decrease``: the same on the reversed milestones

    The ``exp_*`` schedules are still :math:`0.99^{300} \approx 5\%` of the way short at
    :math:`t = T`. All are then clipped to :math:`[k_{\min}, k_{\max}]`, as the official code
    does. The official code has no ``exp_decrease``; it is the mirror of ``exp_increase``, added
    here. Past the last step the multi-step index stays at its last milestone (the official
    code would index out of range). The released Transformer-XL script uses
    ``linear_increase`` from 8 to 16 over 400k steps; the paper's start value may differ
    [UNVERIFIED].

    Parameters
    ----------
    step : int
        ``t`` >= 0.
    mode : str
        One of the rows above.
    k_min, k_max : int
        ``1 <= k_min <= k_max``.
    total_steps : int
        ``T`` >= 1 (``exp_*`` modes need ``T >= 300``, as ``T // 300`` divides).
    milestones : tuple of int
        The multi-step values (official: 1, 2, 4, 8, 16).

    Returns
    -------
    int

    Examples
    --------
    >>> import moerouter as mr
    >>> [mr.k_schedule(t, mode="linear_increase", k_min=8, k_max=16, total_steps=400)
    ...  for t in (0, 100, 200, 400, 800)]
    [8, 10, 12, 16, 16]
    """
    check_choice(mode, "mode", K_SCHEDULES)
    check_positive_int(step, "step", minimum=0)
    check_positive_int(k_min, "k_min")
    check_positive_int(k_max, "k_max")
    if k_min > k_max:
        raise ValueError(f"k_min must be <= k_max = {k_max}, got {k_min}")
    check_positive_int(total_steps, "total_steps")
    # Each expression in the operation order of the official code, so that halves round alike.
    spread = k_max - k_min
    cosine = math.cos(math.pi * step / (2 * total_steps))
    if mode.startswith("exp") and total_steps < 300:
        raise ValueError(f"exp_* schedules need total_steps >= 300, got {total_steps}")
    if mode == "linear_increase":
        k = round(spread * step / total_steps) + k_min
    elif mode == "linear_decrease":
        k = round(-spread * step / total_steps) + k_max
    elif mode == "cosine_decrease":
        k = round(spread * cosine) + k_min
    elif mode == "cosine_increase":
        k = round(-spread * cosine) + k_max
    elif mode == "exp_increase":
        k = round(-spread * 0.99 ** (step // (total_steps // 300))) + k_max
    elif mode == "exp_decrease":
        k = round(spread * 0.99 ** (step // (total_steps // 300))) + k_min
    else:
        steps = [check_int(m, f"milestones[{i}]") for i, m in enumerate(milestones)]
        if not steps or min(steps) < 1:
            raise ValueError(f"milestones must be positive ints, got {milestones!r}")
        values = steps if mode == "multi_step_increase" else steps[::-1]
        k = values[min(int(len(values) * step / total_steps), len(values) - 1)]
    return int(min(max(k, k_min), k_max))


def evaluate_at_k(evaluate: Callable[[int], float], ks: Iterable[int]) -> dict[int, float]:
    """Self-slimming evaluation: one model, several numbers of active experts.

    SMoE-Dropout's claim is that a model trained with a growing ``k`` works at any ``k``; the
    official code evaluates with ``k`` in 1, 2, 4, 8, 16 after training. Set ``k`` from inside
    ``evaluate`` (for example ``router(logits, k=k)`` on :class:`TopK`).

    Parameters
    ----------
    evaluate : callable
        ``evaluate(k) -> float``, the metric at ``k`` experts per token.
    ks : iterable of int
        Values of ``k`` (each >= 1), evaluated in the order given.

    Returns
    -------
    dict
        ``{k: evaluate(k)}``.

    Examples
    --------
    >>> import moerouter as mr
    >>> mr.evaluate_at_k(lambda k: 1.0 / k, [1, 2, 4])
    {1: 1.0, 2: 0.5, 4: 0.25}
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
    results: dict[int, float] = {}
    for k in ks:
        check_positive_int(k, "k")
        results[k] = float(evaluate(k))
    return results
