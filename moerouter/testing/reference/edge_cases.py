"""Logits that exercise the contract's corners at once (``-inf`` entries, rows with one
finite entry, NaN, ``+inf``, all ``-inf`` rows, ties between and inside rows), for every reference
and every backend.
"""

from __future__ import annotations

import numpy as np

__all__ = ["edge_case_logits"]


def edge_case_logits(
    num_groups: int, group_size: int, num_columns: int, *, seed: int = 0, scale: float = 2.0
) -> np.ndarray:
    """Float32 logits (G, S, E') that exercise every routing edge case at once.

    Random normal rows (scaled by ``scale``), then, in the last group: a row with one -inf entry,
    a row whose only finite entry is column 0 (its other choices are -inf), a row holding NaN, a
    row holding +inf, an all -inf row, two identical rows (a tie between tokens) and a row with two
    equal largest entries (a tie inside a row). ``group_size`` must be at least 9.

    Parameters
    ----------
    num_groups, group_size, num_columns : int
        Shape; ``num_columns`` >= 3.
    seed : int
        For :func:`numpy.random.default_rng`.
    scale : float
        Standard deviation of the random logits.

    Returns
    -------
    numpy.ndarray (G, S, E') float32
        Squeeze the first axis for two-dimensional logits when ``num_groups`` is 1.
    """
    if group_size < 9 or num_columns < 3:
        raise ValueError("edge_case_logits needs group_size >= 9 and num_columns >= 3")
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_groups, group_size, num_columns)) * scale).astype(np.float32)
    last = logits[-1]
    last[1, 2] = -np.inf
    last[2, 1:] = -np.inf
    last[3, 0] = np.nan
    last[4, 1] = np.inf
    last[5, :] = -np.inf
    last[7] = last[6]
    last[8, 1] = last[8, 2] = np.max(last[8]) + 1.0
    return logits
