"""Float64 loop references for :mod:`moerouter.methods.confidence`,
:mod:`~moerouter.methods.distillation`, :mod:`~moerouter.methods.multitask` and MEMoE's anchor.

Written from the formulas in the modules' docstrings (and reference/algorithms.md §6, §7, §11),
one row, class or expert at a time in plain Python floats, sharing no code with the modules.
Floating inputs are first rounded to float32, as the modules compute in float32, then everything
is float64. Results are NumPy arrays or Python floats: float64 values, int32 indices, bool masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moerouter.testing.backends import to_numpy

__all__ = [
    "reference_align_gradients",
    "reference_anchor_mean_logits",
    "reference_binary_kl",
    "reference_binary_kl_norm",
    "reference_cross_entropy",
    "reference_dispersion",
    "reference_dual_head_loss",
    "reference_expert_collapse",
    "reference_expert_degradation",
    "reference_expert_normalization",
    "reference_expert_underfitting",
    "reference_feature_gate",
    "reference_hierarchy_mask",
    "reference_mix",
    "reference_mixed_logits_loss",
    "reference_mlp_confidence",
    "reference_multi_gate",
    "reference_power_confidence",
    "reference_predict",
    "reference_predict_mixed",
    "reference_self_gate",
    "reference_weighted_loss",
]


def _f(array: Any) -> np.ndarray:
    """A float32-rounded float64 NumPy copy."""
    return np.asarray(to_numpy(array), dtype=np.float32).astype(np.float64)


def _i(array: Any) -> np.ndarray:
    return np.asarray(to_numpy(array)).astype(np.int64)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softmax_row(row: Sequence[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _argmax(row: Sequence[float]) -> int:
    best = 0
    for index, value in enumerate(row):
        if value > row[best]:
            best = index
    return best


def reference_cross_entropy(logits: Any, labels: Any) -> float:
    z, y = _f(logits), _i(labels)
    total = 0.0
    for n in range(z.shape[0]):
        total -= math.log(_softmax_row(list(z[n]))[y[n]])
    return total / z.shape[0]


def reference_binary_kl_norm(student: Any, teacher: Any, temperature: float = 2.0) -> float:
    """``T^2 / N * sum KL(Bern(1/2) || Bern(sigmoid((s - t) / T)))``, from the KL definition."""
    s, t = _f(student), _f(teacher)
    total = 0.0
    for n in range(s.shape[0]):
        for c in range(s.shape[1]):
            d = (s[n, c] - t[n, c]) / temperature
            # 1 - q as sigmoid(-d): exact where 1 - sigmoid(d) would round to 0
            total += 0.5 * math.log(0.5 / _sigmoid(d)) + 0.5 * math.log(0.5 / _sigmoid(-d))
    return temperature**2 * total / s.shape[0]


def reference_binary_kl(student: Any, teacher: Any, temperature: float = 2.0) -> float:
    s, t = _f(student), _f(teacher)
    total = 0.0
    for n in range(s.shape[0]):
        for c in range(s.shape[1]):
            a, b = t[n, c] / temperature, s[n, c] / temperature
            p, q, not_p, not_q = _sigmoid(a), _sigmoid(b), _sigmoid(-a), _sigmoid(-b)
            total += p * math.log(p / q) + not_p * math.log(not_p / not_q)
    return temperature**2 * total / s.shape[0]


def reference_dual_head_loss(
    main: Any,
    aux: Any,
    teacher: Any,
    labels: Any,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 2.0,
) -> float:
    return ce_weight * reference_cross_entropy(main, labels) + kd_weight * (
        reference_binary_kl_norm(aux, teacher, temperature)
    )


def reference_align_gradients(gradients: Any) -> np.ndarray:
    g = _f(gradients)
    reference = g[0]
    norm_squared = float(sum(v * v for v in reference))
    result = np.zeros(g.shape[1])
    for row in g:
        dot = float(sum(a * b for a, b in zip(row, reference, strict=True)))
        if dot < 0 and norm_squared > 0:
            row = row - dot / norm_squared * reference
        result += row
    return result


def reference_dispersion(weak_logits: Any) -> np.ndarray:
    z = _f(weak_logits)
    num_rows, num_classes = z.shape
    out = np.zeros((num_rows, 2))
    one_hot = [1.0] + [0.0] * (num_classes - 1)
    max_variance = sum((v - 1.0 / num_classes) ** 2 for v in one_hot) / num_classes
    for n in range(num_rows):
        p = _softmax_row(list(z[n]))
        mean = sum(p) / num_classes
        variance = sum((v - mean) ** 2 for v in p) / num_classes
        entropy = -sum(v * math.log(v) for v in p if v > 0)
        out[n] = (variance / max_variance, 1.0 - entropy / math.log(num_classes))
    return out


def reference_power_confidence(weak_logits: Any, alpha: float, measure: str = "variance") -> Any:
    column = reference_dispersion(weak_logits)[:, 0 if measure == "variance" else 1]
    return np.asarray([min(max(v, 0.0), 1.0) ** float(alpha) for v in column])


def reference_mlp_confidence(
    weak_logits: Any, layers: Sequence[tuple[Any, Any]], node_features: Any = None
) -> np.ndarray:
    hidden = reference_dispersion(weak_logits)
    if node_features is not None:
        hidden = np.concatenate([hidden, _f(node_features)], axis=1)
    out = np.zeros(hidden.shape[0])
    for n in range(hidden.shape[0]):
        h = list(hidden[n])
        for index, (weight, bias) in enumerate(layers):
            w, b = _f(weight), _f(bias)
            h = [sum(h[i] * w[i, j] for i in range(len(h))) + b[j] for j in range(w.shape[1])]
            if index < len(layers) - 1:
                h = [max(v, 0.0) for v in h]
        out[n] = _sigmoid(h[0])
    return out


def _nll(row: Sequence[float], label: int) -> float:
    return -math.log(_softmax_row(row)[label])


def reference_weighted_loss(weak: Any, strong: Any, labels: Any, confidence: Any) -> float:
    w, s, y, c = _f(weak), _f(strong), _i(labels), _f(confidence)
    total = 0.0
    for n in range(w.shape[0]):
        total += c[n] * _nll(list(w[n]), y[n]) + (1.0 - c[n]) * _nll(list(s[n]), y[n])
    return total / w.shape[0]


def reference_mixed_logits_loss(weak: Any, strong: Any, labels: Any, confidence: Any) -> float:
    w, s, y, c = _f(weak), _f(strong), _i(labels), _f(confidence)
    total = 0.0
    for n in range(w.shape[0]):
        mixed = [c[n] * a + (1.0 - c[n]) * b for a, b in zip(w[n], s[n], strict=True)]
        total += _nll(mixed, y[n])
    return total / w.shape[0]


def reference_predict(
    weak: Any,
    strong: Any,
    confidence: Any,
    uniform: Any = None,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    w, s, c = _f(weak), _f(strong), _f(confidence)
    draws = None if uniform is None else _f(uniform)
    predictions = np.zeros(w.shape[0], np.int32)
    use_weak = np.zeros(w.shape[0], bool)
    for n in range(w.shape[0]):
        if draws is not None:
            use_weak[n] = draws[n] < c[n]
        else:
            assert threshold is not None
            use_weak[n] = c[n] >= threshold
        predictions[n] = _argmax(list(w[n] if use_weak[n] else s[n]))
    return predictions, use_weak


def reference_predict_mixed(weak: Any, strong: Any, confidence: Any) -> np.ndarray:
    w, s, c = _f(weak), _f(strong), _f(confidence)
    predictions = np.zeros(w.shape[0], np.int32)
    for n in range(w.shape[0]):
        pw, ps = _softmax_row(list(w[n])), _softmax_row(list(s[n]))
        predictions[n] = _argmax([c[n] * a + (1.0 - c[n]) * b for a, b in zip(pw, ps, strict=True)])
    return predictions


def reference_multi_gate(
    gate_logits: Any, visible: Any = None, single_expert: str = "softmax"
) -> np.ndarray:
    z = _f(gate_logits)
    num_rows, num_tasks, num_experts = z.shape
    mask = np.ones((num_tasks, num_experts), bool) if visible is None else to_numpy(visible)
    gates = np.zeros(z.shape)
    for n in range(num_rows):
        for t in range(num_tasks):
            seen = [e for e in range(num_experts) if mask[t, e]]
            if len(seen) == 1 and single_expert == "sigmoid":
                gates[n, t, seen[0]] = _sigmoid(z[n, t, seen[0]])
                continue
            weights = _softmax_row([z[n, t, e] for e in seen])
            for e, weight in zip(seen, weights, strict=True):
                gates[n, t, e] = weight
    return gates


def reference_mix(gates: Any, expert_outputs: Any) -> np.ndarray:
    g, y = _f(gates), _f(expert_outputs)
    num_rows, num_tasks, num_experts = g.shape
    out = np.zeros((num_rows, num_tasks, y.shape[2]))
    for n in range(num_rows):
        for t in range(num_tasks):
            for e in range(num_experts):
                out[n, t] += g[n, t, e] * y[n, e]
    return out


def reference_hierarchy_mask(
    task_category: Sequence[int], num_shared: int, num_per_category: int, num_per_task: int
) -> tuple[np.ndarray, np.ndarray]:
    """Builds the expert list by name, then asks of every (task, expert) pair who owns it."""
    categories = [int(c) for c in task_category]
    owners: list[tuple[str, int]] = [("global", -1)] * num_shared
    for category in range(max(categories) + 1):
        owners += [("category", category)] * num_per_category
    for task in range(len(categories)):
        owners += [("task", task)] * num_per_task
    visible = np.zeros((len(categories), len(owners)), bool)
    specific = np.zeros_like(visible)
    for task, category in enumerate(categories):
        for expert, (kind, owner) in enumerate(owners):
            mine = kind == "task" and owner == task
            visible[task, expert] = (
                kind == "global" or mine or (kind == "category" and owner == category)
            )
            specific[task, expert] = mine
    return visible, specific


def reference_feature_gate(features: Any, down: Any, up: Any) -> np.ndarray:
    v, b, a = _f(features), _f(down), _f(up)
    per_expert = b.ndim == 3
    if not per_expert:
        b, a = b[None], a[None]
    num_rows, width = v.shape
    out = np.zeros((num_rows, b.shape[0], width))
    for n in range(num_rows):
        for e in range(b.shape[0]):
            low = [sum(v[n, i] * b[e, i, r] for i in range(width)) for r in range(b.shape[2])]
            for j in range(width):
                logit = sum(low[r] * a[e, r, j] for r in range(len(low)))
                out[n, e, j] = v[n, j] * 2.0 * _sigmoid(logit)
    return out if per_expert else out[:, 0]


def reference_self_gate(expert_outputs: Any, gate_logits: Any, residual: Any = None) -> np.ndarray:
    y, z = _f(expert_outputs), _f(gate_logits)
    num_rows, num_experts, width = y.shape
    out = np.zeros((num_rows, width)) if residual is None else _f(residual).copy()
    for n in range(num_rows):
        if num_experts == 1:
            weights = [_sigmoid(z[n, 0])]
        else:
            weights = _softmax_row(list(z[n]))
        for e in range(num_experts):
            out[n] += weights[e] * y[n, e]
    return out


def reference_expert_normalization(
    expert_outputs: Any,
    scale: Any = None,
    shift: Any = None,
    mean: Any = None,
    variance: Any = None,
    eps: float = 1e-5,
    activation: str = "swish",
) -> np.ndarray:
    y = _f(expert_outputs)
    flat = y.reshape(y.shape[0], -1)
    gamma = np.broadcast_to(1.0 if scale is None else _f(scale), y.shape[1:]).reshape(-1)
    beta = np.broadcast_to(0.0 if shift is None else _f(shift), y.shape[1:]).reshape(-1)
    out = np.zeros_like(flat)
    for j in range(flat.shape[1]):
        column = [float(v) for v in flat[:, j]]
        if mean is None:
            mu = sum(column) / len(column)
            var = sum((v - mu) ** 2 for v in column) / len(column)
        else:
            mu, var = float(_f(mean).reshape(-1)[j]), float(_f(variance).reshape(-1)[j])
        for n, value in enumerate(column):
            x = gamma[j] * (value - mu) / math.sqrt(var + eps) + beta[j]
            if activation == "swish":
                x = x * _sigmoid(x)
            elif activation == "relu":
                x = max(x, 0.0)
            out[n, j] = x
    return out.reshape(y.shape)


def reference_expert_collapse(activations: Any, atol: float = 0.0) -> dict[str, Any]:
    a = _f(activations)
    num_experts = a.shape[1]
    zero_share, means, stds = np.zeros(num_experts), np.zeros(num_experts), np.zeros(num_experts)
    for e in range(num_experts):
        values = [float(v) for v in a[:, e, :].reshape(-1)]
        zero_share[e] = sum(abs(v) <= atol for v in values) / len(values)
        means[e] = sum(values) / len(values)
        stds[e] = math.sqrt(sum((v - means[e]) ** 2 for v in values) / len(values))
    if stds.min() > 0:
        spread = stds.max() / stds.min()
    else:
        spread = math.inf if stds.max() > 0 else 1.0
    return {"zero_share": zero_share, "mean": means, "std": stds, "scale_spread": spread}


def reference_expert_degradation(gates: Any) -> dict[str, Any]:
    g = _f(gates)
    num_rows, num_tasks, num_experts = g.shape
    mass = g.sum(axis=0) / num_rows
    share = np.zeros_like(mass)
    dominance = np.zeros(num_experts)
    dominant = np.full(num_experts, -1, np.int32)
    for e in range(num_experts):
        total = sum(mass[t, e] for t in range(num_tasks))
        if total <= 0:
            continue
        for t in range(num_tasks):
            share[t, e] = mass[t, e] / total
        dominant[e] = _argmax(list(share[:, e]))
        dominance[e] = share[dominant[e], e]
    return {"mass": mass, "share": share, "dominance": dominance, "dominant_task": dominant}


def reference_expert_underfitting(gates: Any, specific: Any) -> dict[str, Any]:
    g, own = _f(gates), to_numpy(specific)
    num_rows, num_tasks, num_experts = g.shape
    specific_mass, shared_mass = np.zeros(num_tasks), np.zeros(num_tasks)
    for t in range(num_tasks):
        for e in range(num_experts):
            mass = sum(g[n, t, e] for n in range(num_rows)) / num_rows
            if own[t, e]:
                specific_mass[t] += mass
            else:
                shared_mass[t] += mass
    return {"specific_mass": specific_mass, "shared_mass": shared_mass}


def reference_anchor_mean_logits(logits: Any, anchor_ids: Any) -> np.ndarray:
    values = to_numpy(logits).astype(np.float32).astype(np.float64)
    shape = values.shape
    rows = values.reshape(-1, shape[-1])
    anchors = to_numpy(anchor_ids).tolist()
    out = rows.copy()
    for t, anchor in enumerate(anchors):
        if anchor < 0 or not np.all(np.isfinite(rows[t])):
            continue
        members = [s for s, a in enumerate(anchors) if a == anchor and np.all(np.isfinite(rows[s]))]
        out[t] = sum(rows[s] for s in members) / len(members)
    return out.reshape(shape)
