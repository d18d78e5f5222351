"""How often CausalExpertChoice's causal decision agrees with batch expert choice, held out.

Not a test: a measurement for docs/policies/causal_expert_choice.rst. Synthetic, NumPy only, a
fixed random gate (no training of the router): tokens are drawn around 16 cluster centres in
d = 32, logits = x @ W for E = 8 experts, groups of S = 256 tokens, capacity factor 2 (C = 64).
Thresholds are fitted on 200 training batches (8 groups each, momentum 0.99); the predictor is
a per-expert logistic regression on x (the router's input), trained with
``losses.causal_predictor_loss`` (gradient written out) on the same batches. Then 50 held-out
batches compare, per (token, expert) cell, the causal decision with batch expert choice.

    python tools/measure_causal_expert_choice.py [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

import moerouter as mr
from moerouter.policies import expert_choice_targets, threshold_state_init, update_thresholds

D, E, S, G, CF = 32, 8, 256, 8, 2.0


def batches(rng, centres, gate, count):
    for _ in range(count):
        which = rng.integers(0, len(centres), size=(G, S))
        x = centres[which] + 0.5 * rng.standard_normal((G, S, D))
        yield x.astype(np.float32), (x @ gate).astype(np.float32)


def token_layout_taken(routing):
    taken = np.zeros((routing.num_tokens, E), bool)
    ids, tokens = np.asarray(routing.expert_ids), np.asarray(routing.token_ids)
    taken[tokens[ids >= 0], ids[ids >= 0]] = True
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((16, D))
    gate = rng.standard_normal((D, E)) / np.sqrt(D) * 2.0
    threshold_router = mr.CausalExpertChoice(E, CF, mode="threshold")
    predictor_router = mr.CausalExpertChoice(E, CF, mode="predictor")
    capacity = threshold_router.capacity(S)

    state = threshold_state_init(E, xp=np)
    weights, bias, lr = np.zeros((D, E), np.float32), np.zeros(E, np.float32), 0.5
    for x, logits in batches(rng, centres, gate, 200):
        batch = threshold_router(logits, training=True)
        state = update_thresholds(state, batch, momentum=0.99)
        flat_x = x.reshape(-1, D)
        y = np.asarray(expert_choice_targets(batch))
        for _ in range(5):  # a few steps of gradient descent on the BCE per batch
            z = flat_x @ weights + bias
            grad = (1.0 / (1.0 + np.exp(-z)) - y) / y.size  # d causal_predictor_loss / dz
            weights -= lr * E * flat_x.T @ grad
            bias -= lr * E * grad.sum(axis=0)
        loss = float(mr.losses.causal_predictor_loss(flat_x @ weights + bias, batch))

    rows = {"threshold": [], "predictor": []}
    loads = {"threshold": [], "predictor": []}
    for x, logits in batches(rng, centres, gate, 50):
        target = np.asarray(expert_choice_targets(threshold_router(logits, training=True)))
        target = target.astype(bool)
        z = (x.reshape(-1, D) @ weights + bias).reshape(G, S, E).astype(np.float32)
        decisions = {
            "threshold": threshold_router(logits, state.thresholds),
            "predictor": predictor_router(logits, predictor_logits=z),
        }
        for mode, routing in decisions.items():
            taken = token_layout_taken(routing)
            rows[mode].append(
                (
                    np.mean(taken == target),
                    np.sum(taken & target) / np.sum(target),
                    np.sum(taken & target) / max(np.sum(taken), 1),
                )
            )
            loads[mode].append(taken.reshape(G, S, E).sum(axis=1) / capacity)  # (G, E)

    print(f"E={E} S={S} cf={CF} C={capacity}; 200 training batches, 50 held-out, {G} groups each")
    print(f"predictor BCE on the last training batch: {loss:.4f}")
    print("mode       agreement  recall  precision  realised load / C per expert (mean; min..max)")
    for mode in rows:
        agreement, recall, precision = np.mean(rows[mode], axis=0)
        per_expert = np.concatenate(loads[mode]).mean(axis=0)
        every = np.concatenate(loads[mode])
        print(
            f"{mode:10} {agreement:9.4f} {recall:7.4f} {precision:10.4f}  "
            + " ".join(f"{v:.2f}" for v in per_expert)
            + f"  (groups: {every.min():.2f}..{every.max():.2f})"
        )


if __name__ == "__main__":
    main()
