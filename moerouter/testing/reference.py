"""Float64 loop references for every policy, the plan, dispatch, combine, losses and stats.

Each function here is written from the public contract (DESIGN.md and the docstrings of the
policies, :mod:`moerouter.losses` and :mod:`moerouter.stats`), one token or one expert at a time
in plain Python and NumPy float64, and shares no code with :mod:`moerouter._agnostic`. They are
slow and obvious on purpose: a backend kernel that agrees with them agrees with the contract.

Conventions shared by all of them:

* Inputs may be NumPy arrays or arrays of any backend (they are copied to NumPy first); a routing
  or plan may be a :class:`moerouter.Routing` / :class:`moerouter.Plan` or a dict returned here.
* Logits are first rounded to float32, as every policy does, and selection ranks those float32
  values (ties go to the lower index). Probabilities, weights and losses are then computed in
  float64 from them.
* Decisions that compare probabilities of *different* tokens (expert choice, ``drop_policy=
  "probs"``) rank the float64 probabilities: they agree with a float32 backend whenever no two
  such probabilities are within float32 rounding of each other, and always for tokens whose logits
  rows are identical (DESIGN.md, "Expert choice ranks tokens ...").
* Returned dicts hold NumPy arrays: int32 indices, bool masks, float64 values.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy

__all__ = [
    "edge_case_logits",
    "reference_capacity",
    "reference_combine",
    "reference_dispatch",
    "reference_expert_choice",
    "reference_load_balancing",
    "reference_make_plan",
    "reference_null_experts",
    "reference_null_load_balancing",
    "reference_summary",
    "reference_topk",
    "reference_z_loss",
]

ROUTING_ARRAYS = ("token_ids", "expert_ids", "weights", "choice_ids", "probs", "finite_rows")
ROUTING_STATICS = ("num_tokens", "num_experts", "layout", "slots", "num_groups")
PLAN_ARRAYS = (
    "group_sizes",
    "order",
    "inverse",
    "source_tokens",
    "num_valid",
    "combine_rows",
    "combine_weights",
)


def as_dict(obj: Any, names: tuple[str, ...], statics: tuple[str, ...] = ()) -> dict[str, Any]:
    """NumPy copies of the named array fields of a Routing, Plan or dict, plus its static fields."""
    get = obj.get if isinstance(obj, dict) else lambda name: getattr(obj, name)
    out: dict[str, Any] = {name: to_numpy(get(name)) for name in names}
    for name in statics:
        out[name] = get(name)
    return out


def _routing(routing: Any) -> dict[str, Any]:
    return as_dict(routing, ROUTING_ARRAYS, ROUTING_STATICS)


def _plan(plan: Any) -> dict[str, Any]:
    return as_dict(plan, PLAN_ARRAYS, ("num_tokens", "num_experts"))


def _grouped_float32(logits: Any) -> np.ndarray:
    values = to_numpy(logits)
    if values.ndim == 2:
        values = values[None]
    return values.astype(np.float32)


def _row_is_finite(row: np.ndarray) -> bool:
    """No NaN, no +inf, and at least one entry above -inf."""
    ok = all(math.isfinite(v) or v == -math.inf for v in row.tolist())
    return ok and any(v > -math.inf for v in row.tolist())


def _descending(values: list[float]) -> list[int]:
    """Indices of ``values`` from largest to smallest value, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def _ranked_columns(row: np.ndarray) -> list[int]:
    """Columns of a float32 row from largest to smallest value, ties to the lower column."""
    return _descending(row.tolist())


def _softmax(row: np.ndarray) -> np.ndarray:
    values = row.astype(np.float64)
    top = max(v for v in values if v > -math.inf)
    exps = np.array([0.0 if v == -math.inf else math.exp(v - top) for v in values])
    probs: np.ndarray = exps / exps.sum()
    return probs


def _sigmoid(row: np.ndarray) -> np.ndarray:
    out = []
    for v in row.astype(np.float64).tolist():
        # Written in the stable form for either sign: exp never overflows.
        out.append(1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v)))
    return np.array(out)


def reference_capacity(
    capacity_factor: float,
    tokens: int,
    per_token: int,
    experts: int,
    multiple_of: int = 1,
    minimum: int = 0,
) -> int:
    """``max(ceil(capacity_factor * tokens * per_token / experts), minimum)``, rounded up to
    ``multiple_of``.

    The factor is read as the decimal it prints as (``1.1`` means eleven tenths), with exact
    rational arithmetic, so float noise such as ``1.1 * 50 = 55.000000000000007`` never adds a row.
    """
    exact = Fraction(repr(float(capacity_factor))) * tokens * per_token / experts
    raw = max(math.ceil(exact), minimum)
    return max(multiple_of, math.ceil(Fraction(raw, multiple_of)) * multiple_of)


def _token_choice(
    values: np.ndarray,
    num_experts: int,
    k: int,
    weight_rule: Any,
    score_rule: Any,
    *,
    capacity_factor: float | None,
    capacity_multiple_of: int,
    drop_policy: str,
    min_capacity: int = 0,
) -> dict[str, Any]:
    """Shared token-choice loop; ``values`` is float32 (G, S, E')."""
    num_groups, group_size, num_columns = values.shape
    num_tokens = num_groups * group_size
    choice = np.zeros((num_groups, group_size, k), np.int32)
    expert = np.full((num_groups, group_size, k), -1, np.int32)
    weights = np.zeros((num_groups, group_size, k))
    probs = np.zeros((num_groups, group_size, num_columns))
    finite = np.zeros((num_groups, group_size), bool)
    for g in range(num_groups):
        for s in range(group_size):
            row = values[g, s]
            if not _row_is_finite(row):
                # The row routes nowhere; its raw choices are those of an all-zero row.
                choice[g, s] = np.arange(k)
                continue
            finite[g, s] = True
            probs[g, s] = score_rule(row)
            picked = _ranked_columns(row)[:k]
            choice[g, s] = picked
            routed = [j < num_experts and row[j] > -math.inf for j in picked]
            weights[g, s] = weight_rule(row, probs[g, s], picked, routed)
            for slot, column in enumerate(picked):
                if routed[slot]:
                    expert[g, s, slot] = column
                else:
                    weights[g, s, slot] = 0.0

    per_expert = None
    if capacity_factor is not None:
        per_expert = reference_capacity(
            capacity_factor, group_size, k, num_experts, capacity_multiple_of, min_capacity
        )
        drop_over_capacity(expert, weights, probs, choice, per_expert, drop_policy)

    return {
        "token_ids": np.repeat(np.arange(num_tokens, dtype=np.int32), k),
        "expert_ids": expert.reshape(-1),
        "weights": weights.reshape(-1),
        "choice_ids": choice.reshape(-1),
        "probs": probs.reshape(num_tokens, num_columns),
        "finite_rows": finite.reshape(-1),
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "layout": "token",
        "slots": k,
        "num_groups": num_groups,
        "capacity": per_expert,
    }


def drop_over_capacity(
    expert: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    choice: np.ndarray,
    per_expert: int,
    drop_policy: str,
) -> None:
    """Drop, in place, the assignments past ``per_expert`` per expert of each group.

    ``expert``, ``weights`` and ``choice`` are (G, S, k) and ``probs`` (G, S, E'). Slots are taken
    k-major (every first choice before any second choice), tokens in order ("position"), by
    descending probability of the slot's choice ("probs") or of the first choice
    ("batch_priority", V-MoE's BPR); a dropped assignment becomes expert -1, weight 0.
    """
    num_groups, group_size, k = expert.shape
    for g in range(num_groups):
        used: Counter[int] = Counter()  # assignments each expert has taken so far
        for slot in range(k):  # k-major: every first choice before any second choice
            tokens = list(range(group_size))
            if drop_policy == "probs":
                tokens = _descending([probs[g, s, choice[g, s, slot]] for s in tokens])
            elif drop_policy == "batch_priority":  # V-MoE BPR: the first choice ranks all
                tokens = _descending([probs[g, s, choice[g, s, 0]] for s in tokens])
            for s in tokens:
                e = expert[g, s, slot]
                if e < 0:
                    continue
                if used[e] < per_expert:
                    used[e] += 1
                else:
                    expert[g, s, slot] = -1
                    weights[g, s, slot] = 0.0


def _softmax_of_routed(row: np.ndarray, picked: list[int], routed: list[bool]) -> list[float]:
    """Softmax of the routed selected logits (zero elsewhere, all zero if none is routed)."""
    chosen = [float(row[j]) for j, r in zip(picked, routed, strict=True) if r]
    if not chosen:
        return [0.0] * len(picked)
    top = max(chosen)
    total = sum(math.exp(v - top) for v in chosen)
    return [
        math.exp(float(row[j]) - top) / total if r else 0.0
        for j, r in zip(picked, routed, strict=True)
    ]


def reference_topk(
    logits: Any,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    softmax_after_topk: bool = False,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
    min_capacity: int = 0,
) -> dict[str, Any]:
    """What :class:`moerouter.TopK` must return, computed token by token in float64.

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Router logits of any backend and float dtype.
    k, score, normalize, softmax_after_topk, capacity_factor, capacity_multiple_of, drop_policy
    min_capacity
        As in :class:`moerouter.TopK`.

    Returns
    -------
    dict
        The :class:`moerouter.Routing` fields as NumPy arrays (float64 ``weights`` and ``probs``).
    """
    values = _grouped_float32(logits)

    def weight_rule(row, probs, picked, routed):  # type: ignore[no-untyped-def]
        if softmax_after_topk or (score == "softmax" and normalize):
            return _softmax_of_routed(row, picked, routed)
        chosen = [probs[j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
        total = sum(chosen)
        if normalize and total > 0:
            chosen = [w / total for w in chosen]
        return chosen

    return _token_choice(
        values,
        values.shape[-1],
        k,
        weight_rule,
        _softmax if score == "softmax" else _sigmoid,
        capacity_factor=capacity_factor,
        capacity_multiple_of=capacity_multiple_of,
        drop_policy=drop_policy,
        min_capacity=min_capacity,
    )


def reference_null_experts(
    logits: Any,
    num_experts: int,
    num_null: int,
    k: int,
    *,
    capacity_factor: float | None = None,
    capacity_multiple_of: int = 1,
    drop_policy: str = "position",
    min_capacity: int = 0,
) -> dict[str, Any]:
    """What :class:`moerouter.NullExperts` (AdaMoE) must return, token by token in float64.

    Softmax over all ``E + m`` columns, top-k over all of them, weights renormalised over the
    selected real experts only (all zero when a token picked only null experts). Capacity, if set,
    is ``ceil(cf * S * k / E)`` with ``E`` the real experts.

    Parameters
    ----------
    logits : array (T, E + m) or (G, S, E + m)
        Router logits, real expert columns first.
    num_experts, num_null, k, capacity_factor, capacity_multiple_of, drop_policy, min_capacity
        As in :class:`moerouter.NullExperts`.

    Returns
    -------
    dict
        The :class:`moerouter.Routing` fields as NumPy arrays.
    """
    values = _grouped_float32(logits)
    if values.shape[-1] != num_experts + num_null:
        raise ValueError("logits must have num_experts + num_null columns")

    def weight_rule(row, probs, picked, routed):  # type: ignore[no-untyped-def]
        real = [probs[j] if r else 0.0 for j, r in zip(picked, routed, strict=True)]
        total = sum(real)
        return [w / total for w in real] if total > 0 else real

    return _token_choice(
        values,
        num_experts,
        k,
        weight_rule,
        _softmax,
        capacity_factor=capacity_factor,
        capacity_multiple_of=capacity_multiple_of,
        drop_policy=drop_policy,
        min_capacity=min_capacity,
    )


def _expert_layout(
    ranking: np.ndarray,
    probs: np.ndarray,
    routable: np.ndarray,
    finite: np.ndarray,
    per_expert: int,
) -> dict[str, Any]:
    """The "expert" layout routing of every expert-choice policy, expert by expert.

    For every group and expert ``e``: the candidates are the tokens ``s`` with ``routable[g, s,
    e]`` (a finite row and a logit above -inf), best ``ranking`` first, ties to the lower token;
    the expert takes the first ``C = per_expert``, each weighing ``probs[g, s, e]``. A -inf logit
    is never routed to: if fewer than ``C`` tokens are candidates, the remaining slots hold the
    expert's other tokens in token order, as expert -1 with weight 0.
    """
    num_groups, group_size, num_experts = ranking.shape
    token_ids, expert_ids, weights, choice_ids = [], [], [], []
    for g in range(num_groups):
        for e in range(num_experts):
            candidates = [s for s in range(group_size) if routable[g, s, e]]
            candidates.sort(key=lambda s: (-float(ranking[g, s, e]), s))
            taken = candidates[:per_expert]
            others = [s for s in range(group_size) if not routable[g, s, e]]
            padding = others[: per_expert - len(taken)]
            for s in taken:
                token_ids.append(g * group_size + s)
                expert_ids.append(e)
                weights.append(float(probs[g, s, e]))
                choice_ids.append(e)
            for s in padding:
                token_ids.append(g * group_size + s)
                expert_ids.append(-1)
                weights.append(0.0)
                choice_ids.append(e)
    num_tokens = num_groups * group_size
    return {
        "token_ids": np.array(token_ids, np.int32),
        "expert_ids": np.array(expert_ids, np.int32),
        "weights": np.array(weights, np.float64),
        "choice_ids": np.array(choice_ids, np.int32),
        "probs": probs.reshape(num_tokens, num_experts),
        "finite_rows": finite.reshape(-1),
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "layout": "expert",
        "slots": per_expert,
        "num_groups": num_groups,
    }


def reference_expert_choice(
    logits: Any, capacity_factor: float, *, capacity_multiple_of: int = 1
) -> dict[str, Any]:
    """What :class:`moerouter.ExpertChoice` must return, expert by expert in float64.

    Per group of ``S`` tokens, every expert takes the ``C = min(ceil(cf * S / E), S)`` tokens
    (rounded up to ``capacity_multiple_of`` before the cap) with the largest softmax probability,
    best first, ties to the lower token index. A token whose logit for the expert is -inf, or whose
    row is non-finite, is never taken: it only fills slots left over, as expert -1 with weight 0.
    Layout "expert": ``R = G * E * C``.

    Parameters
    ----------
    logits : array (T, E) or (G, S, E)
        Router logits.
    capacity_factor, capacity_multiple_of
        As in :class:`moerouter.ExpertChoice`.

    Returns
    -------
    dict
        The :class:`moerouter.Routing` fields as NumPy arrays.
    """
    values = _grouped_float32(logits)
    num_groups, group_size, num_experts = values.shape
    per_expert = min(
        reference_capacity(capacity_factor, group_size, 1, num_experts, capacity_multiple_of),
        group_size,
    )
    probs = np.zeros((num_groups, group_size, num_experts))
    finite = np.zeros((num_groups, group_size), bool)
    routable = np.zeros((num_groups, group_size, num_experts), bool)
    for g in range(num_groups):
        for s in range(group_size):
            if _row_is_finite(values[g, s]):
                finite[g, s] = True
                probs[g, s] = _softmax(values[g, s])
                routable[g, s] = values[g, s] > -math.inf
    return _expert_layout(probs, probs, routable, finite, per_expert)


def reference_make_plan(routing: Any) -> dict[str, Any]:
    """The :class:`moerouter.Plan` of a routing, built with loops.

    Dispatch rows are expert 0's assignments in assignment order, then expert 1's, ..., then the
    assignments of no expert. Each token's combine row lists its assignments in assignment order
    (its dispatch row, or -1 for an assignment of no expert), padded with -1 to ``fan_in``.

    Parameters
    ----------
    routing : Routing or dict
        Any policy's output, or a reference dict.

    Returns
    -------
    dict
        The :class:`moerouter.Plan` fields as NumPy arrays (float64 ``combine_weights``).
    """
    r = _routing(routing)
    expert_ids, token_ids = r["expert_ids"].tolist(), r["token_ids"].tolist()
    weights = r["weights"].astype(np.float64)
    num_tokens, num_experts = r["num_tokens"], r["num_experts"]
    fan_in = r["slots"] if r["layout"] == "token" else num_experts

    order: list[int] = []
    group_sizes = []
    for e in range(num_experts):
        members = [i for i, expert in enumerate(expert_ids) if expert == e]
        group_sizes.append(len(members))
        order.extend(members)
    num_valid = len(order)
    order.extend(i for i, expert in enumerate(expert_ids) if expert < 0)
    inverse = [0] * len(order)
    for row, assignment in enumerate(order):
        inverse[assignment] = row

    combine_rows = np.full((num_tokens, fan_in), -1, np.int32)
    combine_weights = np.zeros((num_tokens, fan_in))
    for t in range(num_tokens):
        mine = [i for i, token in enumerate(token_ids) if token == t]
        if len(mine) > fan_in:
            raise ValueError(f"token {t} has {len(mine)} assignments, more than fan_in={fan_in}")
        for f, i in enumerate(mine):
            if expert_ids[i] >= 0:
                combine_rows[t, f] = inverse[i]
                combine_weights[t, f] = weights[i]
    return {
        "group_sizes": np.array(group_sizes, np.int32),
        "order": np.array(order, np.int32),
        "inverse": np.array(inverse, np.int32),
        "source_tokens": np.array([token_ids[i] for i in order], np.int32),
        "num_valid": np.array(num_valid, np.int32),
        "combine_rows": combine_rows,
        "combine_weights": combine_weights,
        "num_tokens": num_tokens,
        "num_experts": num_experts,
    }


def reference_dispatch(x: Any, plan: Any) -> np.ndarray:
    """Expert-grouped rows: row ``i`` is ``x[source_tokens[i]]`` below ``num_valid``, else zero.

    Parameters
    ----------
    x : array (T, d)
    plan : Plan or dict

    Returns
    -------
    numpy.ndarray (R, d) float64
        An exact copy of the selected rows (every float32/16 value is exact in float64).
    """
    p = _plan(plan)
    x = to_numpy(x).astype(np.float64)
    out = np.zeros((p["order"].shape[0], x.shape[1]))
    for i in range(int(p["num_valid"])):
        out[i] = x[p["source_tokens"][i]]
    return out


def reference_combine(ye: Any, plan: Any) -> np.ndarray:
    """``y[t] = sum_f w[t, f] * ye[rows[t, f]]`` over the plan's combine rows, in float64.

    Entries with row -1 add nothing, whatever ``ye`` holds elsewhere.

    Parameters
    ----------
    ye : array (R, d)
    plan : Plan or dict

    Returns
    -------
    numpy.ndarray (T, d) float64
    """
    p = _plan(plan)
    ye = to_numpy(ye).astype(np.float64)
    rows, weights = p["combine_rows"], p["combine_weights"].astype(np.float64)
    out = np.zeros((rows.shape[0], ye.shape[1]))
    for t in range(rows.shape[0]):
        for f in range(rows.shape[1]):
            if rows[t, f] >= 0:
                out[t] += weights[t, f] * ye[rows[t, f]]
    return out


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


def reference_summary(routing: Any) -> dict[str, Any]:
    """:func:`moerouter.stats.summary` computed with loops in float64.

    Parameters
    ----------
    routing : Routing or dict

    Returns
    -------
    dict
        The same keys as :func:`moerouter.stats.summary`; counts as int, the rest as float.
    """
    r = _routing(routing)
    num_experts, num_tokens = r["num_experts"], r["num_tokens"]
    fan_in = r["slots"] if r["layout"] == "token" else num_experts
    finite = r["finite_rows"]
    num_finite = int(finite.sum())
    load = np.zeros(num_experts, np.int64)
    per_token = np.zeros(num_tokens, np.int64)
    choices = real_choices = dropped = null_choices = 0
    for token, expert, column in zip(r["token_ids"], r["expert_ids"], r["choice_ids"], strict=True):
        if expert >= 0:
            load[expert] += 1
            per_token[token] += 1
        if not finite[token]:
            continue
        choices += 1
        if column < num_experts:
            real_choices += 1
            dropped += expert < 0
        else:
            null_choices += 1
    mean_load = max(load.mean(), 1e-30)
    histogram = np.zeros(fan_in + 1, np.int64)
    entropies = []
    for t in range(num_tokens):
        if not finite[t]:
            continue
        histogram[per_token[t]] += 1
        row = r["probs"][t].astype(np.float64)
        p = row / row.sum() if row.sum() > 0 else row
        entropies.append(-sum(v * math.log(v) for v in p if v > 0))
    return {
        "tokens_per_expert": load,
        "load_cv": float(load.std() / mean_load),
        "load_max_over_mean": float(load.max() / mean_load),
        "dropped_fraction": dropped / max(real_choices, 1),
        "real_experts_per_token": per_token.sum() / max(num_finite, 1),
        "real_experts_histogram": histogram,
        "null_fraction": null_choices / max(choices, 1),
        "router_entropy": sum(entropies) / max(num_finite, 1),
        "nonfinite_rows": num_tokens - num_finite,
        "processed_by_at_least": np.cumsum(histogram[::-1])[::-1] / max(num_finite, 1),
    }


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
