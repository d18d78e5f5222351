"""Float64 loop references for :mod:`moerouter.losses`: the Switch and null-expert balancing
losses, the z-loss, Shazeer's importance and load losses, and the sequence-level and
concatenated balancing losses, and the routing entropy.

Written from the docstrings, one token or one expert at a time, sharing no code with the losses.
Masks may be (T,) or (G, S) bool arrays of any backend, or None (every token valid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy
from moerouter.testing.reference._common import _grouped_float32, _routing, _row_is_finite

__all__ = [
    "reference_concatenated_load_balancing",
    "reference_entropy",
    "reference_importance_loss",
    "reference_load_balancing",
    "reference_load_loss",
    "reference_normal_cdf",
    "reference_null_load_balancing",
    "reference_sequence_load_balancing",
    "reference_z_loss",
]


def _flat_mask(mask: Any, num_tokens: int) -> np.ndarray:
    """A (T,) bool NumPy copy of a token mask of shape (T,) or (G, S); all True for None."""
    if mask is None:
        return np.ones(num_tokens, bool)
    flat = to_numpy(mask).astype(bool).reshape(-1)
    if flat.shape != (num_tokens,):
        raise ValueError(f"mask has {flat.size} entries for {num_tokens} tokens")
    return flat


def _normalised_row(row: np.ndarray) -> np.ndarray:
    """``p / max(sum(p), 1e-15)`` in float64, the floor of :mod:`moerouter.losses`."""
    row = row.astype(np.float64)
    return row / max(float(row.sum()), 1e-15)


def _counted_pairs(r: dict[str, Any], count: str) -> list[tuple[int, int]]:
    """(token, column) pairs the balancing losses count.

    ``"top_k"`` on a token layout: the ``k`` largest scores of each token, equal scores going
    to the routing's own choices first, then to the lower column; otherwise the raw choices.
    """
    choices = [(int(t), int(c)) for t, c in zip(r["token_ids"], r["choice_ids"], strict=True)]
    if count != "top_k" or r["layout"] != "token":
        return choices
    k = r["slots"]
    pairs = []
    for t in range(r["num_tokens"]):
        chosen = {c for token, c in choices if token == t}
        scores = r["probs"][t]
        ranked = sorted(range(len(scores)), key=lambda e: (-scores[e], e not in chosen, e))
        pairs += [(t, column) for column in ranked[:k]]
    return pairs


def _balance(
    routing: Any,
    convention: str,
    pool_null: bool,
    mask: Any = None,
    per_group: bool = False,
    count: str = "top_k",
) -> float:
    r = _routing(routing)
    pairs = _counted_pairs(r, count)
    num_columns = r["probs"].shape[-1]
    num_groups = r["num_groups"] if per_group or convention == "gshard" else 1
    group_size = r["num_tokens"] // num_groups
    keep = _flat_mask(mask, r["num_tokens"])
    losses = []
    for g in range(num_groups):
        tokens = range(g * group_size, (g + 1) * group_size)
        valid_tokens = {t for t in tokens if r["finite_rows"][t] and keep[t]}
        if not valid_tokens:
            continue  # a group without valid tokens is left out of the mean over groups
        counts = np.zeros(num_columns)
        for token, column in pairs:
            if token in valid_tokens:
                counts[column] += 1
        if pool_null and num_columns > r["num_experts"]:
            counts[r["num_experts"] :] = counts[r["num_experts"] :].mean()
        num_valid = len(valid_tokens)
        mean_probs = sum(_normalised_row(r["probs"][t]) for t in sorted(valid_tokens)) / num_valid
        if convention == "megatron":
            share = counts / counts.sum() if counts.sum() > 0 else counts
        else:
            share = counts / num_valid
        losses.append(num_columns * float(np.sum(share * mean_probs)))
    return float(np.mean(losses)) if losses else 0.0


def reference_load_balancing(
    routing: Any, convention: str = "megatron", mask: Any = None, count: str = "top_k"
) -> float:
    """:func:`moerouter.losses.load_balancing` in float64: ``E' * sum_e f_e * P_e``.

    ``f_e`` counts, for valid tokens (finite rows that ``mask`` keeps), the ``k`` largest
    probabilities of each token (``count="top_k"``, token layout) or the raw choices
    (``choice_ids``, before drops), normalised by all counted choices ("megatron") or by the
    valid tokens ("mixtral", and per group "gshard", averaged over groups holding a valid
    token); ``P_e`` is the mean over valid tokens of the probabilities normalised to sum 1 per
    token.

    Parameters
    ----------
    routing : Routing or dict
    convention : {"megatron", "mixtral", "gshard"}
    mask : array (T,) or (G, S) bool, optional
    count : {"top_k", "choices"}

    Returns
    -------
    float
    """
    return _balance(routing, convention, pool_null=False, mask=mask, count=count)


def reference_null_load_balancing(
    routing: Any,
    null_mode: str = "pooled",
    convention: str = "megatron",
    mask: Any = None,
    count: str = "top_k",
) -> float:
    """:func:`moerouter.losses.null_load_balancing` in float64.

    ``"pooled"`` replaces every null column's count by the mean null count (AdaMoE ``exp_1``);
    ``"per_expert"`` is :func:`reference_load_balancing` over all ``E + m`` columns.

    Parameters
    ----------
    routing : Routing or dict
    null_mode : {"pooled", "per_expert"}
    convention : {"megatron", "mixtral", "gshard"}
    mask : array (T,) or (G, S) bool, optional
    count : {"top_k", "choices"}

    Returns
    -------
    float
    """
    return _balance(routing, convention, pool_null=null_mode == "pooled", mask=mask, count=count)


def reference_z_loss(logits: Any, mask: Any = None) -> float:
    """ST-MoE z-loss in float64: mean over valid rows of ``logsumexp(row)**2``.

    Parameters
    ----------
    logits : array (T, E') or (G, S, E')
        Rounded to float32 first, as :func:`moerouter.losses.z_loss` does.
    mask : array of ``logits.shape[:-1]`` (or flattened) bool, optional
        Valid tokens; finite rows outside it are left out too.

    Returns
    -------
    float
        0 when no row is valid.
    """
    values = _grouped_float32(logits).reshape(-1, np.shape(to_numpy(logits))[-1])
    keep = _flat_mask(mask, values.shape[0])
    squares = []
    for row, kept in zip(values, keep, strict=True):
        if kept and _row_is_finite(row):
            finite = [float(v) for v in row if v > -math.inf]
            top = max(finite)
            squares.append((top + math.log(sum(math.exp(v - top) for v in finite))) ** 2)
    return sum(squares) / max(len(squares), 1)


def _cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return variance / (mean**2 + 1e-10)


def _valid(r: dict[str, Any], mask: Any) -> list[bool]:
    keep = _flat_mask(mask, r["num_tokens"])
    return [bool(r["finite_rows"][t]) and bool(keep[t]) for t in range(r["num_tokens"])]


def reference_normal_cdf(x: float) -> float:
    """The standard normal CDF in float64 from :func:`math.erfc`."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def reference_importance_loss(routing: Any, source: str = "weights", mask: Any = None) -> float:
    """:func:`moerouter.losses.importance_loss` in float64: CV² of the summed gate per expert.

    Parameters
    ----------
    routing : Routing or dict
    source : {"weights", "probs"}
        Combine weights per real expert, or router probabilities per column.
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    float
    """
    r = _routing(routing)
    valid = _valid(r, mask)
    if source == "probs":
        columns = r["probs"].shape[-1]
        importance = [
            sum(float(r["probs"][t, e]) for t in range(r["num_tokens"]) if valid[t])
            for e in range(columns)
        ]
    else:
        importance = [0.0] * r["num_experts"]
        assignments = zip(r["token_ids"], r["expert_ids"], r["weights"], strict=True)
        for token, expert, weight in assignments:
            if expert >= 0 and valid[token]:
                importance[expert] += float(weight)
    return _cv_squared(importance)


def reference_load_loss(
    logits: Any,
    noisy_logits: Any,
    noise_std: Any,
    k: int,
    threshold: str = "shazeer",
    mask: Any = None,
) -> float:
    """:func:`moerouter.losses.load_loss` in float64, token by token with :func:`math.erfc`.

    Parameters
    ----------
    logits, noisy_logits : array (T, E) or (G, S, E)
        Rounded to float32 first.
    noise_std : float or array (scalar or the logits' shape)
    k : int
    threshold : {"shazeer", "vmoe"}
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    float
    """
    clean = _grouped_float32(logits).astype(np.float64)
    num_experts = clean.shape[-1]
    clean = clean.reshape(-1, num_experts)
    noisy = _grouped_float32(noisy_logits).astype(np.float64).reshape(-1, num_experts)
    std = np.asarray(to_numpy(noise_std), np.float32).astype(np.float64)
    std = np.broadcast_to(std.reshape(-1, num_experts) if std.ndim else std, clean.shape)
    keep = _flat_mask(mask, clean.shape[0])
    load = [0.0] * num_experts
    for t in range(clean.shape[0]):
        if not (keep[t] and _row_is_finite(clean[t]) and _row_is_finite(noisy[t])):
            continue
        ranked = sorted(noisy[t].tolist(), reverse=True)
        for e in range(num_experts):
            theta = ranked[k - 1]
            if threshold == "shazeer" and noisy[t, e] > ranked[k]:
                theta = ranked[k]
            if clean[t, e] == -math.inf:
                continue  # never selected
            if theta == -math.inf:
                load[e] += 1.0  # every finite logit clears a -inf threshold
            elif std[t, e] > 0:
                load[e] += reference_normal_cdf((clean[t, e] - theta) / std[t, e])
            else:
                load[e] += float(clean[t, e] > theta)
    return _cv_squared(load)


def reference_sequence_load_balancing(
    routing: Any,
    alpha: float = 1.0,
    mask: Any = None,
    convention: str = "deepseek",
    count: str = "top_k",
) -> float:
    """:func:`moerouter.losses.sequence_load_balancing` in float64, sequence by sequence.

    ``"deepseek"``: ``f_i = E' / (k T_g) * count_i``, ``P_i = mean_t p̂_{t,i}`` per sequence
    (group) ``g``, ``alpha * mean_g sum_i f_i P_i`` over sequences holding a valid token.
    ``"megatron"``: ``T_g`` replaced by the mean valid length over all ``G`` sequences and the
    mean taken over all of them (Megatron-Core ``_apply_seq_aux_loss``).

    Parameters
    ----------
    routing : Routing or dict
    alpha : float
    mask : array (T,) or (G, S) bool, optional
    convention : {"deepseek", "megatron"}
    count : {"top_k", "choices"}

    Returns
    -------
    float
    """
    r = _routing(routing)
    valid = _valid(r, mask)
    pairs = _counted_pairs(r, count)
    columns = r["probs"].shape[-1]
    k = r["slots"]
    group_size = r["num_tokens"] // r["num_groups"]
    mean_length = sum(valid) / r["num_groups"]
    losses = []
    for g in range(r["num_groups"]):
        tokens = [t for t in range(g * group_size, (g + 1) * group_size) if valid[t]]
        if not tokens:
            if convention == "megatron":
                losses.append(0.0)  # an all-padding sequence still counts in the mean
            continue
        length = mean_length if convention == "megatron" else len(tokens)
        counts = [0] * columns
        for token, column in pairs:
            if token in tokens:
                counts[column] += 1
        f = [columns * c / (k * length) for c in counts]
        p = np.zeros(columns)
        for t in tokens:
            p += _normalised_row(r["probs"][t]) / length
        losses.append(sum(f[i] * float(p[i]) for i in range(columns)))
    return alpha * (sum(losses) / len(losses)) if losses else 0.0


def reference_concatenated_load_balancing(
    routings: Sequence[Any],
    convention: str = "megatron",
    masks: Sequence[Any] | None = None,
    count: str = "top_k",
) -> float:
    """:func:`reference_load_balancing` of several routings concatenated along tokens.

    The concatenation is built as a dict (token ids shifted, groups merged into one), so the
    global-batch state functions can be checked without routing the concatenated logits.
    """
    parts = [_routing(r) for r in routings]
    masks = list(masks) if masks is not None else [None] * len(parts)
    offset = 0
    merged: dict[str, list[Any]] = {name: [] for name in ("token_ids", "choice_ids")}
    probs, finite = [], []
    for part, mask in zip(parts, masks, strict=True):
        merged["token_ids"].append(part["token_ids"] + offset)
        merged["choice_ids"].append(part["choice_ids"])
        probs.append(part["probs"])
        finite.append(part["finite_rows"] & _flat_mask(mask, part["num_tokens"]))
        offset += part["num_tokens"]
    concatenated = {
        "token_ids": np.concatenate(merged["token_ids"]),
        "choice_ids": np.concatenate(merged["choice_ids"]),
        "expert_ids": np.concatenate(merged["choice_ids"]),
        "weights": np.zeros(sum(len(c) for c in merged["choice_ids"])),
        "probs": np.concatenate(probs),
        "finite_rows": np.concatenate(finite),
        "num_tokens": offset,
        "num_experts": parts[0]["num_experts"],
        "layout": parts[0]["layout"],
        "slots": parts[0]["slots"],
        "num_groups": 1,
    }
    return _balance(concatenated, convention, pool_null=False, count=count)


def reference_entropy(routing: Any, mask: Any = None) -> float:
    """:func:`moerouter.losses.entropy` in float64: mean over valid tokens of ``-sum p̂ log p̂``.

    Parameters
    ----------
    routing : Routing or dict
    mask : array (T,) or (G, S) bool, optional

    Returns
    -------
    float
    """
    r = _routing(routing)
    valid = _valid(r, mask)
    entropies: list[float] = []
    for t in range(r["num_tokens"]):
        if valid[t]:
            p: list[float] = _normalised_row(r["probs"][t]).tolist()
            entropies.append(-sum(v * math.log(v) for v in p if v > 0))
    return sum(entropies) / max(len(entropies), 1)
