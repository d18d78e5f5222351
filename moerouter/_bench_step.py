"""``python -m moerouter bench --step``: a whole MoE routing step against transformers' OLMoE block.

One training step of an MoE layer, identity experts, torch CPU, on the same inputs (hidden
states ``x`` (T, d) and router logits (T, E); the gate projection that makes the logits is the
same matmul on both sides and is left out of both):

- **moerouter**: ``mr.TopK(E, k)`` (softmax, exact ties, renormalised top-k), the balancing loss
  (``load_balancing``, transformers' ``"mixtral"`` convention), ``z_loss``, ``make_plan``,
  ``dispatch`` and ``combine``.
- **OLMoE** (transformers' ``OlmoeTopKRouter`` + ``OlmoeExperts`` eager forward with the expert
  MLP replaced by identity, as a user of ``OlmoeSparseMoeBlock`` runs it): softmax in float32,
  ``torch.topk``, renormalisation (``norm_topk_prob=True``, as ``mr.TopK`` renormalises), the
  ``one_hot`` expert mask and the per-expert ``where`` / gather / weight / ``index_add_`` loop;
  plus transformers' ``load_balancing_loss_func`` on the layer's logits, which
  ``OlmoeForCausalLM`` computes in every training step (``output_router_logits=True``).

Each piece is also timed alone, with ``stats.summary`` beside them, relative to the router.
Times are CPU seconds of the process (``time.process_time``: every intra-op thread counts) and
the ratio is the median of interleaved (OLMoE, moerouter) pairs, so load from other processes
moves both sides alike. The load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import moerouter as mr

__all__ = ["STEP_SHAPES", "step_main", "step_table"]

#: ``--step`` shapes (T, E, k, d) by ``--shape``; ``olmoe`` ends at issue 16's target shape.
STEP_SHAPES: dict[str, list[tuple[int, int, int, int]]] = {
    "ci-tiny": [(64, 8, 2, 256)],
    "mixtral": [(4096, 8, 2, 4096)],
    "olmoe": [(4096, 64, 8, 2048), (16384, 64, 8, 2048)],
    "all": [(4096, 8, 2, 4096), (4096, 64, 8, 2048), (16384, 64, 8, 2048)],
}


def _cpu_seconds(run: Callable[[], Any]) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def _olmoe_step(torch: Any, transformers_loss: Callable[..., Any], experts: int, k: int) -> Any:
    """transformers' OLMoE routing + identity-expert loop + load-balancing loss."""
    functional = torch.nn.functional

    def router(logits: Any) -> tuple[Any, Any]:  # OlmoeTopKRouter.forward after F.linear
        probs = functional.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, k, dim=-1)
        top_value /= top_value.sum(dim=-1, keepdim=True)  # norm_topk_prob
        return top_value.to(logits.dtype), top_index

    def experts_loop(x: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        # OlmoeExperts.forward (eager), the expert MLP replaced by identity.
        final = torch.zeros_like(x)
        with torch.no_grad():
            expert_mask = functional.one_hot(top_k_index, num_classes=experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current = x[token_idx]
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final

    def aux_loss(logits: Any) -> Any:
        return transformers_loss((logits,), experts, k)

    def step(x: Any, logits: Any) -> tuple[Any, Any]:
        weights, index = router(logits)
        return experts_loop(x, index, weights), aux_loss(logits)

    step.router = router  # type: ignore[attr-defined]
    step.experts_loop = experts_loop  # type: ignore[attr-defined]
    step.aux_loss = aux_loss  # type: ignore[attr-defined]
    return step


def _moerouter_step(experts: int, k: int) -> Any:
    policy = mr.TopK(experts, k)

    def step(x: Any, logits: Any) -> tuple[Any, Any, Any]:
        routing = policy(logits)
        balance = mr.losses.load_balancing(routing, convention="mixtral")
        z = mr.losses.z_loss(logits)
        plan = mr.make_plan(routing)
        return mr.combine(mr.dispatch(x, plan), plan), balance, z

    step.policy = policy  # type: ignore[attr-defined]
    return step


def step_table(shape_name: str, repeat: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-piece CPU times and the whole-step ratio at each shape; (rows, mismatches)."""
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for shape in STEP_SHAPES[shape_name]:
        shape_rows, shape_failures = _step_shape(*shape, repeat=repeat, seed=seed)
        rows.extend(shape_rows)
        failures.extend(shape_failures)
    return rows, failures


def _step_shape(
    tokens: int, experts: int, k: int, dim: int, *, repeat: int, seed: int
) -> tuple[list[dict[str, Any]], list[str]]:
    import torch
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func  # type: ignore[import-not-found, unused-ignore]

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((tokens, dim), dtype=np.float32))
    logits = torch.from_numpy(rng.standard_normal((tokens, experts), dtype=np.float32))
    olmoe = _olmoe_step(torch, load_balancing_loss_func, experts, k)
    ours = _moerouter_step(experts, k)
    label = f"{tokens},{experts},{k},{dim}"
    failures: list[str] = []

    # Same answer first: identity experts give y = x * (sum of weights = 1).
    y_theirs, aux_theirs = olmoe(x, logits)
    y_ours, balance, _ = ours(x, logits)
    if not torch.allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5):
        failures.append(f"step T,E,k,d={label}: combine output != OLMoE's")
    if not torch.allclose(balance, aux_theirs.float(), rtol=1e-4, atol=1e-6):
        failures.append(f"step T,E,k,d={label}: load_balancing != load_balancing_loss_func")

    routing = ours.policy(logits)
    plan = mr.make_plan(routing)
    ye = mr.dispatch(x, plan)
    weights, index = olmoe.router(logits)
    pieces: list[tuple[str, str, Callable[[], Any]]] = [
        ("moerouter", "router mr.TopK", lambda: ours.policy(logits)),
        (
            "moerouter",
            "load_balancing",
            lambda: mr.losses.load_balancing(routing, convention="mixtral"),
        ),
        ("moerouter", "z_loss", lambda: mr.losses.z_loss(logits)),
        ("moerouter", "make_plan", lambda: mr.make_plan(routing)),
        ("moerouter", "dispatch", lambda: mr.dispatch(x, plan)),
        ("moerouter", "combine", lambda: mr.combine(ye, plan)),
        ("moerouter", "stats.summary", lambda: mr.stats.summary(routing)),
        ("olmoe", "router softmax+topk+renorm", lambda: olmoe.router(logits)),
        ("olmoe", "load_balancing_loss_func", lambda: olmoe.aux_loss(logits)),
        ("olmoe", "per-expert gather/index_add", lambda: olmoe.experts_loop(x, index, weights)),
        ("olmoe", "WHOLE STEP", lambda: olmoe(x, logits)),
        ("moerouter", "WHOLE STEP", lambda: ours(x, logits)),
    ]
    times: dict[tuple[str, str], list[float]] = {(side, piece): [] for side, piece, _ in pieces}
    for _, _, run in pieces:
        run()  # warm-up
    for _ in range(repeat):  # interleaved: every piece once per round
        for side, piece, run in pieces:
            times[(side, piece)].append(_cpu_seconds(run))
    theirs, ours_times = times[("olmoe", "WHOLE STEP")], times[("moerouter", "WHOLE STEP")]
    speedup = statistics.median(t / m for t, m in zip(theirs, ours_times, strict=True))
    router_ms = 1e3 * statistics.median(times[("moerouter", "router mr.TopK")])
    rows = []
    for (side, piece), values in times.items():
        ms = 1e3 * statistics.median(values)
        row = {"T,E,k,d": label, "side": side, "piece": piece, "cpu_ms": ms}
        row["vs_router"] = ms / router_ms
        if side == "moerouter" and piece == "WHOLE STEP":
            row["speedup"] = speedup
        rows.append(row)
    return rows, failures


def _format(rows: list[dict[str, Any]]) -> str:
    header = f"{'T,E,k,d':<18} {'side':<10} {'piece':<30} {'cpu ms':>9} {'/ router':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        extra = f"   speedup vs OLMoE {r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(
            f"{r['T,E,k,d']:<18} {r['side']:<10} {r['piece']:<30} {r['cpu_ms']:>9.3f} "
            f"{r['vs_router']:>8.2f}x{extra}"
        )
    return "\n".join(lines)


def step_main(args: argparse.Namespace) -> int:
    """``bench --step``: the table, and 1 if moerouter's step disagreed with OLMoE's."""
    try:
        import torch
        import transformers  # type: ignore[import-not-found, unused-ignore]
    except ImportError as error:
        print(f"bench --step needs torch and transformers: {error}")
        return 1
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"moerouter {mr.__version__} bench --step: python {platform.python_version()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, float32, CPU; load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; median of {args.repeat} interleaved runs, process CPU time"
    )
    rows, failures = step_table(
        args.shape if args.shape in STEP_SHAPES else "ci-tiny", args.repeat, args.seed
    )
    print(_format(rows))
    print(
        "\nspeedup = median over interleaved pairs of OLMoE step time / moerouter step time "
        "(moerouter: TopK + load_balancing + z_loss + make_plan + dispatch + combine; OLMoE: "
        "softmax + topk + renorm + load_balancing_loss_func + per-expert gather/index_add loop)."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"step": rows}, handle, indent=1)
    for failure in failures:
        print(f"MISMATCH: {failure}")
    return 1 if failures else 0
