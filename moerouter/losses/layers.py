"""Combining the losses of several layers: :func:`aggregate`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
)

__all__ = ["aggregate"]


def aggregate(
    per_layer: Sequence[Mapping[str, Array]] | Sequence[Array],
    *,
    weights: Sequence[float] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Any:
    r"""Combine per-layer losses (or per-layer dicts of losses) into one.

    ``reduction="sum"``: :math:`\sum_l w_l L_l`; ``reduction="mean"``:
    :math:`\sum_l w_l L_l / \sum_l w_l` (the plain mean when ``weights`` is None). Dicts are
    combined key by key and must all have the same keys.

    Peers differ here: Megatron-Core's tracker averages each loss over layers, MegaBlocks'
    ``batched_load_balancing_loss`` scales by :math:`1/L` over the layers of a pipeline stage,
    AdaMoE's ``exp_1`` sums layers (``reduction="sum"``), and transformers' Mixtral loss is taken
    over the *concatenated* layers, which is not a per-layer combination at all: use
    :func:`accumulate` over layers with :func:`load_balancing_from_state` for that.

    Parameters
    ----------
    per_layer : sequence of arrays, or sequence of dicts of str to array
        One entry per layer; arrays of one backend and shape (usually scalars).
    weights : sequence of float, optional
        One non-negative weight per layer; default all 1.
    reduction : {"mean", "sum"}
        Weighted mean or weighted sum.

    Returns
    -------
    array, or dict of str to array
        Same kind as the entries of ``per_layer``; gradients flow to every layer's loss.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> layers = [{"aux": xp.asarray(1.0), "z": xp.asarray(2.0)},
    ...           {"aux": xp.asarray(3.0), "z": xp.asarray(4.0)}]
    >>> {name: float(v) for name, v in mr.losses.aggregate(layers).items()}
    {'aux': 2.0, 'z': 3.0}
    >>> float(mr.losses.aggregate([xp.asarray(1.0), xp.asarray(3.0)], reduction="sum"))
    4.0
    """
    check_choice(reduction, "reduction", ("mean", "sum"))
    if isinstance(per_layer, Mapping) or is_array_api_obj(per_layer):
        raise TypeError("per_layer must be a sequence with one entry per layer")
    entries = list(per_layer)
    if not entries:
        raise ValueError("per_layer must hold at least one layer")
    if weights is None:
        factors = [1.0] * len(entries)
    else:
        factors = [float(w) for w in weights]
        if len(factors) != len(entries):
            raise ValueError(
                f"weights has {len(factors)} entries but per_layer has {len(entries)} layers"
            )
        if not all(math.isfinite(w) and w >= 0 for w in factors):
            raise ValueError(f"weights must be finite and >= 0, got {factors}")
    divisor = sum(factors) if reduction == "mean" else 1.0
    if reduction == "mean" and divisor <= 0:
        raise ValueError("weights must not all be 0 for reduction='mean'")

    def combine(values: list[Array], name: str) -> Array:
        for value in values:
            if not is_array_api_obj(value):
                raise TypeError(f"{name} must hold arrays, got {type(value).__name__}")
        array_namespace(*values)  # one backend, or a clear TypeError
        total = values[0] * factors[0]
        for value, factor in zip(values[1:], factors[1:], strict=True):
            total = total + value * factor
        return total / divisor if divisor != 1.0 else total

    if all(isinstance(entry, Mapping) for entry in entries):
        keys = list(entries[0])
        for index, entry in enumerate(entries):
            if set(entry) != set(keys):
                raise ValueError(
                    f"per_layer[{index}] has keys {sorted(entry)}, per_layer[0] has {sorted(keys)}"
                )
        return {
            key: combine([entry[key] for entry in entries], f"per_layer[*][{key!r}]")
            for key in keys
        }
    if any(isinstance(entry, Mapping) for entry in entries):
        raise TypeError("per_layer must hold only arrays or only dicts, not both")
    return combine(entries, "per_layer")
